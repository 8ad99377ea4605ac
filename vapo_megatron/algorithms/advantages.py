"""Advantage estimators: GAE (fixed, per-sequence and length-adaptive lambda), decoupled GAE, group baselines.

Pure tensor math: no ``torch.distributed``, no Megatron. Layout convention for every ``[B, T]`` tensor: one row per
response, positions are response tokens, right-padded; ``mask`` is 1 on response tokens and 0 on padding. The
response tokens of a row must be contiguous (right padding is the usual layout; left padding also works).

Notation follows docs/VAPO.md: ``delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)`` with ``V(s_{L+1}) = 0``,
``A_t = sum_k (gamma * lam)^k delta_{t+k}`` and ``G_t = A_t + V(s_t)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DecoupledGAE",
    "decoupled_gae",
    "gae",
    "gae_deltas",
    "group_normalized_advantages",
    "length_adaptive_lambda",
    "reverse_discounted_cumsum",
    "token_rewards_from_scores",
    "uniform_group_mask",
]

# Chunk length of the scan. Within a chunk we run log2(C) doubling steps; the chunk starts are combined by the same
# scan one level up (T / C elements). 32 measured fastest on CPU for T in [1k, 32k]; any power of two is correct.
DEFAULT_CHUNK_SIZE = 32


def _decay_column(decay: float | Tensor, batch: int, device: torch.device) -> Tensor:
    """The per-row decay as a float64 ``[B, 1]`` (or ``[1, 1]`` for a scalar) column, validated into [0, 1]."""
    d = torch.as_tensor(decay, dtype=torch.float64, device=device)
    if d.dim() == 0:
        d = d.reshape(1, 1)
    elif d.dim() == 1 and d.shape[0] == batch:
        d = d.reshape(batch, 1)
    else:
        raise ValueError(f"decay must be a float or a [B]={batch} tensor, got shape {tuple(d.shape)}")
    if not bool(((d >= 0) & (d <= 1)).all()):
        raise ValueError(f"decay (gamma * lam) must lie in [0, 1], got min {d.min().item()} max {d.max().item()}")
    return d


def _scan_within_chunks(a: Tensor, d: Tensor) -> Tensor:
    """In-chunk reverse discounted cumsum of ``a`` ``[B, N, C]`` (consumed) by Hillis-Steele doubling.

    After the step with shift ``s`` each element holds ``sum_{k < 2s} d^k a_{t+k}`` (within the chunk). Only
    multiplications by ``d^s <= 1`` occur, so nothing is divided by small powers of ``d``; powers are taken in float64.
    """
    chunk = a.shape[-1]
    b = torch.empty_like(a)
    s = 1
    while s < chunk:
        ds = (d**s).to(a.dtype).unsqueeze(-1)  # [B or 1, 1, 1]
        torch.addcmul(a[..., :-s], a[..., s:], ds, out=b[..., :-s])
        b[..., -s:] = a[..., -s:]
        a, b = b, a
        s *= 2
    return a


def _reverse_discounted_cumsum(x: Tensor, d: Tensor, chunk_size: int, consume: bool = False) -> Tensor:
    """Recursive chunked scan; ``d`` is a float64 ``[B or 1, 1]`` column. Returns a contiguous ``[B, T]`` tensor.

    With ``consume=True`` a contiguous ``x`` whose length fills whole chunks is used as scratch space (saves a copy).
    """
    batch, length = x.shape
    chunk = min(chunk_size, 1 << max(length - 1, 0).bit_length())
    n_chunks = math.ceil(length / chunk)
    padded = n_chunks * chunk != length
    if padded:
        buf = x.new_zeros(batch, n_chunks * chunk)
        buf[:, :length] = x
    else:
        buf = x if consume and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)
    y = _scan_within_chunks(buf.view(batch, n_chunks, chunk), d)
    if n_chunks > 1:
        # y[:, n, 0] is the local sum of chunk n; the full value at every chunk start is the same scan one level up
        # with decay d^C. Position i of chunk n then adds d^(C - i) times the full value at the next chunk's start.
        starts = _reverse_discounted_cumsum(y[:, :, 0], d**chunk, chunk_size, consume=True)
        offsets = torch.arange(chunk, 0, -1, dtype=torch.float64, device=x.device)
        carry_decay = (d**offsets).to(x.dtype)  # [B or 1, C]
        y[:, :-1, :].addcmul_(starts[:, 1:, None], carry_decay[:, None, :])
    y = y.view(batch, n_chunks * chunk)
    return y[:, :length].contiguous() if padded else y


def reverse_discounted_cumsum(x: Tensor, decay: float | Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE) -> Tensor:
    """``y[b, t] = sum_{k >= 0} decay_b^k * x[b, t + k]`` along the last dimension, vectorised.

    Args:
        x: ``[B, T]`` floating tensor.
        decay: a float or a ``[B]`` tensor in ``[0, 1]`` (``0`` gives ``y = x``, ``1`` a plain reverse cumsum).
        chunk_size: scan chunk length (power of two >= 2); affects speed only.

    Chunked doubling scan: ``log2(chunk_size)`` elementwise passes, then the chunk starts are combined by the same
    scan on ``T / chunk_size`` elements (recursively). Every term is a product of powers ``decay^k <= 1`` taken in
    float64, so float32 results stay at rounding level for any ``T`` and any decay in ``[0, 1]``.
    """
    if x.dim() != 2:
        raise ValueError(f"x must be [B, T], got shape {tuple(x.shape)}")
    return _checked_scan(x, decay, chunk_size)


def _checked_scan(x: Tensor, decay: float | Tensor, chunk_size: int, consume: bool = False) -> Tensor:
    if chunk_size < 2 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_size must be a power of two >= 2, got {chunk_size}")
    if x.shape[1] == 0:
        return x.clone()
    return _reverse_discounted_cumsum(x, _decay_column(decay, x.shape[0], x.device), chunk_size, consume)


def gae_deltas(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """TD residuals ``delta_t = r_t + gamma * V_{t+1} - V_t`` on response tokens, 0 elsewhere, ``[B, T]``.

    ``V_{t+1}`` is taken as 0 past the last response token (``V(s_{L+1}) = 0``) and wherever ``mask`` is 0, so
    padding values may hold anything finite.
    """
    if not (rewards.shape == values.shape == mask.shape) or rewards.dim() != 2:
        raise ValueError(
            f"rewards, values, mask must share one [B, T] shape, got {tuple(rewards.shape)}, "
            f"{tuple(values.shape)}, {tuple(mask.shape)}"
        )
    maskf = mask.to(values.dtype)
    # Fused multiply-adds, no masked copy of the values: GAE is memory-bound, every [B, T] pass counts.
    deltas = torch.addcmul(rewards, values, maskf, value=-1)
    deltas[:, :-1].addcmul_(values[:, 1:], maskf[:, 1:], value=gamma)
    return deltas.mul_(maskf)


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float | Tensor,
    *,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation, vectorised over tokens.

    Args:
        rewards: ``[B, T]`` token rewards (usually the verifier score on the last response token, 0 elsewhere).
        values: ``[B, T]`` critic values ``V(s_t)``.
        mask: ``[B, T]`` 1 on response tokens (contiguous per row), 0 on padding; bool, int or float.
        gamma: discount in ``[0, 1]`` (VAPO uses 1.0).
        lam: a float or a ``[B]`` tensor of per-sequence lambdas in ``[0, 1]``.
        chunk_size: scan chunk length (power of two >= 2); affects speed only.

    Returns:
        ``(advantages, returns)``, both ``[B, T]`` in the dtype of ``values``, 0 where ``mask`` is 0, with
        ``returns = advantages + values`` on response tokens.
    """
    deltas = gae_deltas(rewards, values, mask, gamma)
    maskf = mask.to(values.dtype)
    lam_t = torch.as_tensor(lam, dtype=torch.float64, device=values.device)
    advantages = _checked_scan(deltas, gamma * lam_t, chunk_size, consume=True).mul_(maskf)
    return advantages, torch.addcmul(advantages, values, maskf)


def length_adaptive_lambda(lengths: Tensor, alpha: float) -> Tensor:
    """VAPO length-adaptive GAE lambda ``1 - 1 / (alpha * l)`` per response, clamped into ``[0, 1)``.

    Args:
        lengths: ``[B]`` response lengths (tokens); any numeric dtype.
        alpha: positive constant (VAPO uses 0.05), so that ``1 / (1 - lam) = alpha * l`` when unclamped.

    Returns:
        ``[B]`` float32 lambdas. Lengths with ``alpha * l <= 1`` (including ``l = 0``) give 0; the upper bound is the
        largest float32 below 1, so very long responses never reach exactly 1.
    """
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, got {alpha}")
    scaled = lengths.to(torch.float64) * alpha
    lam = torch.where(scaled > 1, 1 - 1 / scaled.clamp(min=1), torch.zeros_like(scaled))
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    return lam.clamp(max=below_one).to(torch.float32)


def ev_lengthened_lambda(lam: Tensor, ev: float, threshold: float) -> Tensor:
    """Policy lambdas lengthened toward 1 as the critic explains less of the return (issue 25; a departure from the
    paper, whose horizon ignores the critic's quality): ``lam + (1 - lam) * (1 - clip(ev / threshold, 0, 1))``.

    ``ev >= threshold`` leaves ``lam``; ``ev <= 0`` gives 1 (Monte-Carlo advantages with the critic only as a
    baseline, unbiased whatever it predicts); a NaN ``ev`` (undefined: every return equal) leaves ``lam``.

    Args:
        lam: ``[B]`` float lambdas (length-adaptive or fixed).
        ev: the step's explained variance of the critic's values against the return (``ev_mc``).
        threshold: the ev at and above which the critic is trusted as configured (> 0).
    """
    if not threshold > 0:
        raise ValueError(f"threshold must be positive, got {threshold}")
    if math.isnan(ev):
        return lam.clone()
    trust = min(max(ev / threshold, 0.0), 1.0)
    return lam + (1 - lam) * (1 - trust)


@dataclass(frozen=True)
class DecoupledGAE:
    """Output of :func:`decoupled_gae`."""

    advantages: Tensor
    """``[B, T]`` policy advantages computed with ``lam_policy``."""
    returns: Tensor
    """``[B, T]`` critic targets ``A(lam_critic) + V``."""
    lam_policy: Tensor
    """``[B]`` float32 policy lambda used per sequence."""


def decoupled_gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    *,
    gamma: float = 1.0,
    lam_policy: float | Tensor | None = None,
    alpha: float | None = None,
    lam_critic: float = 1.0,
    coupled: bool = False,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> DecoupledGAE:
    """VAPO decoupled (and optionally length-adaptive) GAE: one set of TD residuals, two lambdas.

    Give exactly one of ``lam_policy`` (a float, 0.95 in the paper's fixed setting, or a ``[B]`` tensor) and
    ``alpha`` (length-adaptive ``lam_policy = 1 - 1 / (alpha * L)``, 0.05 in the paper). Critic targets use
    ``lam_critic`` (1.0: unbiased Monte-Carlo return). ``coupled=True`` is the paper's ablation "without decoupled
    GAE": the critic's targets use the policy's lambda (fixed or length-adaptive, per sequence) and ``lam_critic``
    is ignored. Shapes and masking as in :func:`gae`.
    """
    if (lam_policy is None) == (alpha is None):
        raise ValueError(f"give exactly one of lam_policy and alpha, got lam_policy={lam_policy!r}, alpha={alpha!r}")
    batch = values.shape[0]
    if alpha is not None:
        lam_vec = length_adaptive_lambda(mask.sum(dim=-1), alpha).to(values.device)
    else:
        lam_vec = torch.as_tensor(lam_policy, dtype=torch.float32, device=values.device)
        if lam_vec.dim() > 1 or lam_vec.numel() not in (1, batch):
            raise ValueError(f"lam_policy must be a float or a [B]={batch} tensor, got shape {tuple(lam_vec.shape)}")
        lam_vec = lam_vec.expand(batch).clone()
    deltas = gae_deltas(rewards, values, mask, gamma)
    maskf = mask.to(values.dtype)
    # Scalar lambdas keep a scalar decay (one broadcast factor per pass instead of a per-row column).
    scalar_lam = alpha is None and not isinstance(lam_policy, Tensor)
    policy_decay = gamma * torch.as_tensor(lam_policy if scalar_lam else lam_vec, dtype=torch.float64)
    advantages = _checked_scan(deltas, policy_decay, chunk_size, consume=coupled).mul_(maskf)
    if coupled:  # one lambda for both: the returns are the policy's advantages plus the values
        return DecoupledGAE(advantages=advantages, returns=torch.addcmul(advantages, values, maskf),
                            lam_policy=lam_vec)
    critic_adv = _checked_scan(deltas, gamma * lam_critic, chunk_size, consume=True).mul_(maskf)
    return DecoupledGAE(advantages=advantages, returns=critic_adv.addcmul_(values, maskf), lam_policy=lam_vec)


def _group_index(n: int, group_size: int | None, group_ids: Tensor | None, device: torch.device) -> Tensor:
    """Dense group index ``[N]`` in ``[0, num_groups)`` from either a fixed group size or arbitrary group ids."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size and group_ids")
    if group_ids is not None:
        if group_ids.shape != (n,):
            raise ValueError(f"group_ids must be [N]={n}, got shape {tuple(group_ids.shape)}")
        return torch.unique(group_ids, return_inverse=True)[1].to(device)
    if group_size < 1 or n % group_size:
        raise ValueError(f"{n} responses cannot be split into groups of {group_size}")
    return torch.arange(n, device=device) // group_size


def _group_stats(scores: Tensor, index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-group count, mean and unbiased (Bessel) std, in float64, indexed per group."""
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    s = scores.to(torch.float64)
    count = torch.zeros(num_groups, dtype=torch.float64, device=s.device).index_add_(0, index, torch.ones_like(s))
    mean = torch.zeros_like(count).index_add_(0, index, s) / count
    sq_dev = torch.zeros_like(count).index_add_(0, index, (s - mean[index]) ** 2)
    std = (sq_dev / (count - 1).clamp(min=1)).sqrt()
    return count, mean, std


def group_normalized_advantages(
    scores: Tensor,
    mask: Tensor,
    *,
    group_size: int | None = None,
    group_ids: Tensor | None = None,
    eps: float = 1e-6,
    norm_by_std: bool = True,
) -> Tensor:
    """GRPO/DAPO value-free baseline: ``(score - group mean) / (group std + eps)`` broadcast over response tokens.

    Args:
        scores: ``[N]`` scalar reward per response.
        mask: ``[N, T]`` response-token mask.
        group_size: responses per prompt when groups are consecutive rows (``N % group_size == 0``), or
        group_ids: ``[N]`` arbitrary integer prompt ids (exactly one of the two).
        eps: added to the std.
        norm_by_std: divide by the std (GRPO); ``False`` keeps only the mean baseline (Dr.GRPO).

    Returns:
        ``[N, T]`` advantages in the dtype of ``scores``, 0 where ``mask`` is 0. The std is the unbiased (Bessel)
        sample std, as GRPO implementations use; a group of one response gets advantage 0.
    """
    if scores.dim() != 1 or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(f"scores must be [N] and mask [N, T], got {tuple(scores.shape)} and {tuple(mask.shape)}")
    index = _group_index(scores.shape[0], group_size, group_ids, scores.device)
    _, mean, std = _group_stats(scores, index)
    adv = scores.to(torch.float64) - mean[index]
    if norm_by_std:
        adv = adv / (std[index] + eps)
    return adv.to(scores.dtype)[:, None] * mask.to(scores.dtype)


def uniform_group_mask(scores: Tensor, *, group_size: int | None = None, group_ids: Tensor | None = None) -> Tensor:
    """``[N]`` bool: True for responses whose group has all-equal scores (no learning signal in GRPO/DAPO).

    DAPO's dynamic sampling drops (and resamples) these groups. Groups given as in
    :func:`group_normalized_advantages`; a group of one response counts as uniform.
    """
    index = _group_index(scores.shape[0], group_size, group_ids, scores.device)
    num_groups = int(index.max().item()) + 1 if index.numel() else 0
    lo = scores.new_full((num_groups,), math.inf).scatter_reduce(0, index, scores, reduce="amin")
    hi = scores.new_full((num_groups,), -math.inf).scatter_reduce(0, index, scores, reduce="amax")
    return (lo == hi)[index]


def token_rewards_from_scores(scores: Tensor, mask: Tensor) -> Tensor:
    """Place each response's scalar score on its last response token: ``r_L = R``, ``r_t = 0`` for ``t < L``.

    Args:
        scores: ``[B]`` per-response reward.
        mask: ``[B, T]`` response-token mask.

    Returns:
        ``[B, T]`` token rewards in the dtype of ``scores``; an empty response (no mask) gets no reward.
    """
    if scores.dim() != 1 or mask.dim() != 2 or mask.shape[0] != scores.shape[0]:
        raise ValueError(f"scores must be [B] and mask [B, T], got {tuple(scores.shape)} and {tuple(mask.shape)}")
    rewards = torch.zeros(mask.shape, dtype=scores.dtype, device=scores.device)
    if mask.shape[1] == 0:
        return rewards
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask.bool(), positions, -1).amax(dim=-1)
    # Empty rows write a 0 at position 0, leaving them all-zero (no host sync to drop them).
    placed = torch.where(last >= 0, scores, torch.zeros_like(scores))
    return rewards.scatter_(1, last.clamp(min=0)[:, None], placed[:, None])


def whiten_advantages(advantages: Tensor, mask: Tensor, eps: float = 1e-8, shift_mean: bool = True) -> Tensor:
    """Normalise advantages over all response tokens of the batch: ``(A - mean) / std`` (masked; unbiased
    variance, as verl's ``masked_whiten``). Standard PPO practice for GAE advantages; not in the VAPO paper's text,
    switchable by ``algorithm.whiten_advantages``. The batch must be the whole rollout batch (the trainer holds it
    on every rank), so the statistics are global without a collective.

    Args:
        advantages: ``[B, T]``.
        mask: ``[B, T]`` response-token mask; positions outside it come back as 0.
        shift_mean: subtract the mean (False keeps the sign of every advantage, only rescales).
    """
    if advantages.shape != mask.shape:
        raise ValueError(f"advantages {tuple(advantages.shape)} and mask {tuple(mask.shape)} differ in shape")
    m = mask.to(advantages.dtype)
    n = m.sum()
    if n < 2:
        return advantages * m
    mean = (advantages * m).sum() / n
    var = (((advantages - mean) * m) ** 2).sum() / (n - 1)
    centred = advantages - mean if shift_mean else advantages
    return centred * torch.rsqrt(var + eps) * m
