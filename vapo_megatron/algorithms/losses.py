"""PPO losses for VAPO: policy (clip-higher, optional dual clip), value, positive-example NLL, entropy.

Pure tensor math: no ``torch.distributed``, no Megatron. Every function takes per-token tensors ``[B, T]``, a mask
and EXPLICIT global normalisers, and returns ``(loss, metrics)`` where ``metrics`` maps names to detached 0-dim
tensors (no ``.item()``: no device sync).

Global normalisers (docs/VAPO.md, "parallel-aware"): ``global_tokens`` is the number of valid tokens of one optimizer
step over all data-parallel / context-parallel ranks and gradient-accumulation micro-batches; ``global_seqs`` the
number of non-empty sequences; ``global_correct_tokens`` the valid tokens of correct responses. Compute them with
:mod:`vapo_megatron.algorithms.metrics` (``count_*``) and all-reduce. With them, summing the per-micro-batch losses
(and their gradients) over micro-batches and ranks gives exactly the full-batch loss. Metrics are normalised the same
way: each is a sum already divided by the global count, so metrics also sum over micro-batches and ranks. When a
normaliser is ``None`` the local count of the tensors passed is used (right only for one micro-batch on one rank).
Counts below 1 are treated as 1, so an empty batch gives 0 rather than NaN.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor

from vapo_megatron.algorithms.metrics import count_correct_tokens, count_seqs, count_tokens, masked_sum

__all__ = [
    "LossAgg",
    "aggregate_loss",
    "entropy_loss",
    "get_loss_agg",
    "loss_agg_names",
    "policy_loss",
    "positive_lm_loss",
    "register_loss_agg",
    "truncated_is_weights",
    "value_loss",
]

Number = int | float
Normaliser = Tensor | Number | None
Metrics = dict[str, Tensor]

# Bounds on log(pi / pi_old) before exp: keeps the ratio finite for garbage (e.g. padding) log-probs. Only tokens with
# a ratio outside [e^-20, e^20] are affected, far beyond any clip range, where PPO's clipped term has no gradient.
_MAX_LOG_RATIO = 20.0


class LossAgg(Protocol):
    """Reduces a per-token loss ``[B, T]`` to a scalar given explicit (global) normalisers."""

    def __call__(
        self,
        loss: Tensor,
        mask: Tensor,
        *,
        global_tokens: Normaliser,
        global_seqs: Normaliser,
        norm_len: Number | None,
    ) -> Tensor: ...


_LOSS_AGGS: dict[str, LossAgg] = {}


def register_loss_agg(name: str) -> Callable[[LossAgg], LossAgg]:
    """Decorator registering a loss aggregation mode under ``name``; raises ``ValueError`` on a duplicate name."""

    def decorator(fn: LossAgg) -> LossAgg:
        if name in _LOSS_AGGS:
            raise ValueError(f"loss aggregation {name!r} is already registered (by {_LOSS_AGGS[name]!r})")
        _LOSS_AGGS[name] = fn
        return fn

    return decorator


def get_loss_agg(name: str) -> LossAgg:
    """The aggregation registered as ``name``; ``ValueError`` listing the valid names otherwise."""
    try:
        return _LOSS_AGGS[name]
    except KeyError:
        raise ValueError(f"unknown loss aggregation {name!r}; valid names: {', '.join(loss_agg_names())}") from None


def loss_agg_names() -> list[str]:
    """Sorted names of the registered aggregation modes."""
    return sorted(_LOSS_AGGS)


def _normaliser(value: Normaliser, local: Tensor, like: Tensor) -> Tensor:
    """``value`` (or the local count when None) as a 0-dim tensor of ``like``'s dtype, clamped to >= 1."""
    chosen = local if value is None else value
    return torch.as_tensor(chosen, dtype=like.dtype, device=like.device).clamp(min=1)


def _seq_lengths(mask: Tensor) -> Tensor:
    return mask.bool().sum(dim=-1)


@register_loss_agg("token-mean")
def _token_mean(
    loss: Tensor, mask: Tensor, *, global_tokens: Normaliser, global_seqs: Normaliser, norm_len: Number | None
) -> Tensor:
    """VAPO token-level loss: sum over all valid tokens / ``global_tokens``."""
    return masked_sum(loss, mask) / _normaliser(global_tokens, count_tokens(mask), loss)


@register_loss_agg("seq-mean-token-mean")
def _seq_mean_token_mean(
    loss: Tensor, mask: Tensor, *, global_tokens: Normaliser, global_seqs: Normaliser, norm_len: Number | None
) -> Tensor:
    """Classic PPO: per-sequence token mean, summed over sequences / ``global_seqs``."""
    per_seq = masked_sum(loss, mask, dim=-1) / _seq_lengths(mask).clamp(min=1).to(loss.dtype)
    return per_seq.sum() / _normaliser(global_seqs, count_seqs(mask), loss)


@register_loss_agg("seq-mean-token-sum")
def _seq_mean_token_sum(
    loss: Tensor, mask: Tensor, *, global_tokens: Normaliser, global_seqs: Normaliser, norm_len: Number | None
) -> Tensor:
    """Per-sequence token sum, summed over sequences / ``global_seqs``."""
    return masked_sum(loss, mask) / _normaliser(global_seqs, count_seqs(mask), loss)


@register_loss_agg("seq-mean-token-sum-norm")
def _seq_mean_token_sum_norm(
    loss: Tensor, mask: Tensor, *, global_tokens: Normaliser, global_seqs: Normaliser, norm_len: Number | None
) -> Tensor:
    """Dr.GRPO: per-sequence token sum / ``norm_len`` (a constant, e.g. max response length), mean over sequences.

    ``norm_len`` defaults to the padded length ``T`` of this tensor, which changes between micro-batches: pass the
    configured maximum response length for a split-invariant loss.
    """
    length = loss.shape[-1] if norm_len is None else norm_len
    if not length > 0:
        raise ValueError(f"norm_len must be positive, got {length}")
    return masked_sum(loss, mask) / (length * _normaliser(global_seqs, count_seqs(mask), loss))


def aggregate_loss(
    loss: Tensor,
    mask: Tensor,
    agg: str = "token-mean",
    *,
    global_tokens: Normaliser = None,
    global_seqs: Normaliser = None,
    norm_len: Number | None = None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` with the registered mode ``agg`` (see :func:`loss_agg_names`)."""
    if loss.shape != mask.shape:
        raise ValueError(f"loss and mask shapes differ: {tuple(loss.shape)} vs {tuple(mask.shape)}")
    fn = get_loss_agg(agg)
    return fn(loss, mask, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float = 0.28,
    dual_clip: float | None = None,
    is_weights: Tensor | None = None,
    agg: str = "token-mean",
    global_tokens: Normaliser = None,
    global_seqs: Normaliser = None,
    norm_len: Number | None = None,
) -> tuple[Tensor, Metrics]:
    """PPO clipped surrogate with clip-higher (VAPO/DAPO): per token
    ``max(-A * rho, -A * clip(rho, 1 - eps_low, 1 + eps_high))``, ``rho = exp(logprobs - old_logprobs)``.

    Args:
        logprobs, old_logprobs, advantages, mask: ``[B, T]``; gradients flow through ``logprobs`` only.
        eps_low, eps_high: clip range (paper: 0.2 and 0.28).
        dual_clip: optional constant ``c > 1`` (dual-clip PPO): for ``A < 0`` the per-token loss is capped at
            ``-c * A``. Not part of VAPO; off by default.
        is_weights: optional ``[B, T]`` per-token weights (e.g. :func:`truncated_is_weights`) multiplying the
            per-token loss after clipping; treated as constants (detached). Not part of VAPO; None: no weights.
        agg, global_tokens, global_seqs, norm_len: aggregation mode and normalisers (module docstring).

    Metrics (sums over valid tokens divided by ``global_tokens``, whatever ``agg`` is):
        ``pg_loss``: the returned loss, detached.
        ``clip_frac_low``: tokens where the clipped term is strictly larger than the unclipped one and
            ``rho < 1 - eps_low`` (only with ``A < 0``): the lower clip is active and the token has no gradient.
        ``clip_frac_high``: the same with ``rho > 1 + eps_high`` (only with ``A > 0``).
        ``dual_clip_frac``: tokens where the dual clip cap is the value used (only when ``dual_clip`` is set).
        ``approx_kl``: k3 estimator ``(rho - 1) - log(rho)`` of KL(pi_old || pi) (non-negative, unbiased under pi_old).
        ``ratio_mean``: mean of ``rho``.
    """
    if dual_clip is not None and not dual_clip > 1:
        raise ValueError(f"dual_clip must be > 1, got {dual_clip}")
    log_ratio = (logprobs - old_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1 - eps_low, 1 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    dual_active = None
    if dual_clip is not None:
        cap = -advantages * dual_clip
        dual_active = (advantages < 0) & (per_token > cap)
        per_token = torch.where(dual_active, cap, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len)
    with torch.no_grad():
        n = _normaliser(global_tokens, count_tokens(mask), ratio)
        clip_active = clipped > unclipped
        metrics = {
            "pg_loss": loss.detach(),
            "clip_frac_low": masked_sum((clip_active & (ratio < 1 - eps_low)).to(ratio.dtype), mask) / n,
            "clip_frac_high": masked_sum((clip_active & (ratio > 1 + eps_high)).to(ratio.dtype), mask) / n,
            "approx_kl": masked_sum((ratio - 1) - log_ratio, mask) / n,
            "ratio_mean": masked_sum(ratio, mask) / n,
        }
        if dual_active is not None:
            metrics["dual_clip_frac"] = masked_sum(dual_active.to(ratio.dtype), mask) / n
    return loss, metrics


def truncated_is_weights(
    old_logprobs: Tensor,
    rollout_logprobs: Tensor,
    mask: Tensor,
    *,
    cap: float,
    global_tokens: Normaliser = None,
) -> tuple[Tensor, Metrics]:
    """Truncated importance sampling (TIS) weights ``min(exp(old_logprobs - rollout_logprobs), cap)`` per token.

    The rollout engine (vLLM) samples from its own numerics, not exactly from the trainer's ``pi_old``; the ratio of
    the trainer's to the sampler's probability of each sampled token corrects the policy gradient for that mismatch,
    and the cap bounds its variance (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"; verl and slime apply it the same way). Not part of VAPO: the paper treats the samples as drawn
    from ``pi_old``, which is this with every weight 1.

    Args:
        old_logprobs: ``[B, T]`` the trainer's log-probs of the sampled tokens before the update.
        rollout_logprobs: ``[B, T]`` the sampler's log-probs of the same tokens.
        mask: ``[B, T]`` valid tokens; weights at padding are 1 (finite whatever the log-probs hold there).
        cap: upper bound on the weight, >= 1.
        global_tokens: normaliser of the metrics (module docstring).

    Returns:
        ``(weights, metrics)``: detached weights ``[B, T]``; ``tis_ratio_mean`` (mean untruncated ratio) and
        ``tis_capped_frac`` (tokens whose ratio exceeds ``cap``), sums over valid tokens / ``global_tokens``.
    """
    if not cap >= 1:
        raise ValueError(f"TIS cap must be >= 1, got {cap}")
    with torch.no_grad():
        log_ratio = (old_logprobs - rollout_logprobs).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ratio = torch.where(mask.bool(), torch.exp(log_ratio), torch.ones_like(log_ratio))
        weights = ratio.clamp(max=cap)
        n = _normaliser(global_tokens, count_tokens(mask), ratio)
        metrics = {"tis_ratio_mean": masked_sum(ratio, mask) / n,
                   "tis_capped_frac": masked_sum((ratio > cap).to(ratio.dtype), mask) / n}
    return weights, metrics


def value_loss(
    values: Tensor,
    old_values: Tensor | None,
    returns: Tensor,
    mask: Tensor,
    *,
    clip: float | None = None,
    agg: str = "token-mean",
    global_tokens: Normaliser = None,
    global_seqs: Normaliser = None,
    norm_len: Number | None = None,
) -> tuple[Tensor, Metrics]:
    """Critic loss ``0.5 * (V - G)^2`` per token, optionally PPO value clipping.

    With ``clip`` set, ``V_clip = old_values + clamp(V - old_values, -clip, clip)`` and the per-token loss is
    ``0.5 * max((V - G)^2, (V_clip - G)^2)``; ``old_values`` is only needed then. VAPO states no value clipping.

    Metrics (sums over valid tokens divided by ``global_tokens``): ``value_loss`` (the returned loss, detached),
    ``value_clip_frac`` (tokens where the clipped error is strictly larger, i.e. the clipped term is used; 0 without
    clipping), ``value_mean`` (mean of ``V``).
    """
    err = (values - returns) ** 2
    per_token = err
    clip_active = torch.zeros_like(mask, dtype=torch.bool)
    if clip is not None:
        if old_values is None:
            raise ValueError("value clipping needs old_values")
        clipped_values = old_values + (values - old_values).clamp(-clip, clip)
        err_clipped = (clipped_values - returns) ** 2
        per_token = torch.maximum(err, err_clipped)
        clip_active = err_clipped > err
    loss = aggregate_loss(
        0.5 * per_token, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len
    )
    with torch.no_grad():
        n = _normaliser(global_tokens, count_tokens(mask), values)
        metrics = {
            "value_loss": loss.detach(),
            "value_clip_frac": masked_sum(clip_active.to(values.dtype), mask) / n,
            "value_mean": masked_sum(values.detach(), mask) / n,
        }
    return loss, metrics


def positive_lm_loss(
    logprobs: Tensor,
    mask: Tensor,
    is_correct: Tensor,
    *,
    global_correct_tokens: Normaliser = None,
) -> tuple[Tensor, Metrics]:
    """VAPO positive-example LM loss: ``-(1 / sum_{o in T} |o|) * sum_{o in T} sum_t log pi(a_t | s_t)``.

    Args:
        logprobs: ``[B, T]`` token log-probs under the current policy.
        mask: ``[B, T]`` response-token mask.
        is_correct: ``[B]`` bool, the set ``T`` of correct responses.
        global_correct_tokens: valid tokens of correct responses over all micro-batches and ranks of the step. It
            must be global: normalising per micro-batch weights tokens of micro-batches with few correct tokens up.

    Returns:
        ``(loss, {"nll_loss": ...})``; the loss is 0 (still attached to the graph) when there are no correct tokens.
        The caller scales it by ``mu`` (0.1 in the paper).
    """
    if is_correct.shape != logprobs.shape[:1]:
        raise ValueError(f"is_correct must be [B]={logprobs.shape[0]}, got shape {tuple(is_correct.shape)}")
    positive = mask.bool() & is_correct.bool()[:, None]
    n = _normaliser(global_correct_tokens, count_correct_tokens(mask, is_correct), logprobs)
    loss = -masked_sum(logprobs, positive) / n
    return loss, {"nll_loss": loss.detach()}


def entropy_loss(
    entropy: Tensor,
    mask: Tensor,
    *,
    agg: str = "token-mean",
    global_tokens: Normaliser = None,
    global_seqs: Normaliser = None,
    norm_len: Number | None = None,
) -> tuple[Tensor, Metrics]:
    """Aggregated token entropy (a mean under ``token-mean``). It is an entropy, not a penalty: to encourage
    exploration a caller subtracts ``coef * loss``. Metrics: ``entropy`` (the loss, detached)."""
    loss = aggregate_loss(entropy, mask, agg, global_tokens=global_tokens, global_seqs=global_seqs, norm_len=norm_len)
    return loss, {"entropy": loss.detach()}
