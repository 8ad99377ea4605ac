"""Global sums and counts: every token mean of the losses and metrics divides by a count taken over the whole
optimizer step (all DP/CP ranks and all gradient-accumulation micro-batches), so the result does not depend on
how the batch was split. These are the only collectives the math needs."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from vapo_megatron.algorithms import count_correct_tokens, count_seqs, count_tokens, explained_variance_stats


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    """In-place SUM over `group` (a no-op without torch.distributed or with one rank); returns `t`."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def global_counts(masks: Sequence[torch.Tensor], is_correct: Sequence[torch.Tensor] | None = None, group=None
                  ) -> dict[str, torch.Tensor]:
    """Token, sequence and correct-response-token counts over all micro-batches here and all ranks of `group`
    (the data-parallel group, including CP). One all-reduce for all three."""
    tokens = sum(count_tokens(m).double() for m in masks)
    seqs = sum(count_seqs(m).double() for m in masks)
    correct = (sum(count_correct_tokens(m, c).double() for m, c in zip(masks, is_correct))
               if is_correct is not None else torch.zeros((), dtype=torch.float64))
    stacked = all_reduce_sum(torch.stack([tokens, seqs, correct]), group)
    return {"tokens": stacked[0], "seqs": stacked[1], "correct_tokens": stacked[2]}


def global_explained_variance_stats(returns: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                                    masks: Sequence[torch.Tensor], group=None) -> torch.Tensor:
    """Sufficient statistics of explained variance summed over micro-batches and ranks (feed them to
    `algorithms.explained_variance_from_stats`); never an average of per-micro-batch ratios."""
    stats = sum(explained_variance_stats(g, v, m) for g, v, m in zip(returns, values, masks))
    return all_reduce_sum(stats, group)


def gather_sequence_parallel(t: torch.Tensor, group, dim: int = 0) -> torch.Tensor:
    """Concatenate along `dim` the sequence shards of the ranks of `group` (no autograd: for GAE inputs)."""
    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts, dim=dim)
