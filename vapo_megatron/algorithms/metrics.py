"""Masked reductions, global counts and explained variance from all-reducible sufficient statistics.

Pure tensor math: no ``torch.distributed``. Everything a caller must all-reduce is returned as a tensor (counts,
sums, a stats vector), so a layer above can sum it over data-parallel ranks and micro-batches and then finish the
computation here; results then do not depend on how the batch was split.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "count_correct_tokens",
    "count_seqs",
    "count_tokens",
    "explained_variance",
    "explained_variance_from_stats",
    "explained_variance_mc",
    "explained_variance_stats",
    "first_error_credit",
    "masked_max",
    "masked_mean",
    "masked_min",
    "masked_sum",
    "monte_carlo_returns",
]

# Var(G) at or below this fraction of E[G^2] + E[(G - V)^2] is rounding noise: treated as zero variance.
_RELATIVE_VARIANCE_FLOOR = 1e-10


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is nonzero (over all elements, or along ``dim``).

    Masked-out entries are replaced by 0 before summing (not multiplied), so non-finite padding does not leak in.
    """
    picked = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return picked.sum() if dim is None else picked.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None, count: Tensor | float | None = None) -> Tensor:
    """``masked_sum / count``; ``count`` defaults to the local number of valid entries, and is clamped to >= 1.

    Pass a global ``count`` (valid entries over all ranks and micro-batches) to get a term that sums correctly.
    """
    if count is None:
        count = mask.bool().sum() if dim is None else mask.bool().sum(dim=dim)
    count = torch.as_tensor(count, dtype=x.dtype, device=x.device).clamp(min=1)
    return masked_sum(x, mask, dim) / count


def _masked_extreme(x: Tensor, mask: Tensor, dim: int | None, fill: float, largest: bool) -> Tensor:
    """Max (or min) over valid entries with ``fill`` (the reduction's identity) for empty selections."""
    picked = torch.where(mask.bool(), x, torch.full((), fill, dtype=x.dtype, device=x.device))
    if dim is None:
        picked = picked.reshape(-1)
        dim = 0
    if picked.shape[dim] == 0:  # amax/amin refuse empty reductions
        shape = list(picked.shape)
        del shape[dim]
        return torch.full(shape, fill, dtype=x.dtype, device=x.device)
    return picked.amax(dim=dim) if largest else picked.amin(dim=dim)


def masked_max(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Max of ``x`` over valid entries; ``-inf`` where there are none (the identity of an all-reduce MAX)."""
    return _masked_extreme(x, mask, dim, -math.inf, largest=True)


def masked_min(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Min of ``x`` over valid entries; ``+inf`` where there are none (the identity of an all-reduce MIN)."""
    return _masked_extreme(x, mask, dim, math.inf, largest=False)


def count_tokens(mask: Tensor) -> Tensor:
    """Number of valid tokens (0-dim int64): all-reduce it into the ``global_tokens`` of the loss functions."""
    return mask.bool().sum()


def count_seqs(mask: Tensor) -> Tensor:
    """Number of rows with at least one valid token (0-dim int64): all-reduce it into ``global_seqs``."""
    return mask.bool().any(dim=-1).sum()


def count_correct_tokens(mask: Tensor, is_correct: Tensor) -> Tensor:
    """Valid tokens of correct responses (0-dim int64): all-reduce it into ``global_correct_tokens``."""
    return (mask.bool() & is_correct.bool()[:, None]).sum()


def explained_variance_stats(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Sufficient statistics of explained variance over valid tokens, as one all-reducible float64 vector.

    Returns:
        ``[5]`` float64: ``[sum G, sum G^2, sum (G - V), sum (G - V)^2, count]``. Sum it over micro-batches and
        ranks (one all-reduce), then call :func:`explained_variance_from_stats`.
    """
    g = returns.detach().to(torch.float64)
    residual = g - values.detach().to(torch.float64)
    m = mask.bool()
    return torch.stack(
        [
            masked_sum(g, m),
            masked_sum(g * g, m),
            masked_sum(residual, m),
            masked_sum(residual * residual, m),
            m.sum().to(torch.float64),
        ]
    )


def explained_variance_from_stats(stats: Tensor) -> Tensor:
    """``1 - Var(G - V) / Var(G)`` (population variances) from :func:`explained_variance_stats`, summed globally.

    Returns a 0-dim float64 tensor; NaN when there are no tokens or ``Var(G)`` is zero up to rounding, where
    explained variance is undefined, e.g. all returns equal. "Up to rounding" is ``Var(G) <= 1e-10 * (E[G^2] +
    E[(G - V)^2])``: returns computed in float32 as ``advantages + values`` carry rounding noise of the values'
    scale (~1e-8 |V|), so all-equal returns have a tiny non-zero variance that would otherwise divide Var(G - V)
    into -1e13.
    """
    sum_g, sum_g2, sum_r, sum_r2, count = stats.to(torch.float64).unbind()
    n = count.clamp(min=1)
    mean_sq_g = sum_g2 / n
    var_g = mean_sq_g - (sum_g / n) ** 2
    var_r = sum_r2 / n - (sum_r / n) ** 2
    defined = (count > 0) & (var_g > _RELATIVE_VARIANCE_FLOOR * (mean_sq_g + sum_r2 / n))
    ev = 1 - var_r.clamp(min=0) / torch.where(defined, var_g, torch.ones_like(var_g))
    return torch.where(defined, ev, torch.full_like(ev, math.nan))


def explained_variance(returns: Tensor, values: Tensor, mask: Tensor) -> Tensor:
    """Local explained variance of ``values`` against ``returns`` (one process, one batch)."""
    return explained_variance_from_stats(explained_variance_stats(returns, values, mask))


def monte_carlo_returns(scores: Tensor, mask: Tensor) -> Tensor:
    """The undiscounted Monte-Carlo return of every response token: the final reward ``scores [B]`` broadcast over
    the valid tokens of ``mask [B, T]`` (gamma = 1; 0 on padding)."""
    return torch.where(mask.bool(), scores.to(torch.float64)[:, None], torch.zeros((), dtype=torch.float64))


def explained_variance_mc(values: Tensor, scores: Tensor, mask: Tensor) -> Tensor:
    """Explained variance of ``values [B, T]`` against the Monte-Carlo return (:func:`monte_carlo_returns`).

    Unlike :func:`explained_variance` against a variant's own GAE targets (bootstrapped on its own critic when
    lam_critic < 1), this target is the same for every variant, so critics of PPO and VAPO can be compared. NaN
    when every return is equal (all responses scored the same): undefined, never a huge negative number.
    """
    return explained_variance(monte_carlo_returns(scores, mask), values, mask)


def first_error_credit(advantages: Tensor, mask: Tensor, error_mask: Tensor) -> dict[str, Tensor]:
    """How much blame the tokens of a response's first wrong step get, against the rest of that response.

    Args:
        advantages: ``[B, T]`` per-token advantages.
        mask: ``[B, T]`` valid response tokens.
        error_mask: ``[B, T]`` tokens of the first wrong step (within ``mask``); rows with none are ignored.

    Returns 0-dim float64 tensors (NaN where undefined):
        ``first``: mean advantage over all first-wrong-step tokens (pooled over rows);
        ``rest``: mean advantage over the other valid tokens of those rows (pooled);
        ``ratio``: ``first / rest``, defined only when ``rest < 0`` (both blamed; > 1 means the first wrong step
        is blamed more); ``gap``: mean over rows having both kinds of token of
        ``mean_first(row) - mean_rest(row)``, exactly 0 for sequence-level advantages (GRPO/DAPO), negative when
        the first wrong step is blamed more; ``rows``: number of rows with a first wrong step.
    """
    a = advantages.detach().to(torch.float64)
    m = mask.bool()
    err = error_mask.bool() & m
    rows = err.any(dim=-1)
    rest = m & ~err & rows[:, None]
    nan = torch.full((), math.nan, dtype=torch.float64)
    n_first, n_rest = err.sum(), rest.sum()
    first_mean = masked_sum(a, err) / n_first if n_first > 0 else nan
    rest_mean = masked_sum(a, rest) / n_rest if n_rest > 0 else nan
    ratio = first_mean / rest_mean if n_rest > 0 and rest_mean < 0 else nan
    per_first = masked_sum(a, err, dim=-1) / err.sum(dim=-1).clamp(min=1)
    per_rest = masked_sum(a, rest, dim=-1) / rest.sum(dim=-1).clamp(min=1)
    both = rows & rest.any(dim=-1)
    gap = (per_first - per_rest)[both].mean() if both.any() else nan
    return {"first": first_mean, "rest": rest_mean, "ratio": ratio, "gap": gap,
            "rows": rows.sum().to(torch.float64)}
