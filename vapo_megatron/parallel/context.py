"""Context parallelism (CP): which sequence positions a CP rank holds, and putting per-token results back together.

megatron-core's load balancing for causal attention: the sequence is cut into 2 * cp equal chunks and CP rank r
holds chunks r and 2cp - 1 - r (an early, cheap chunk with a late, expensive one). Inputs (`input_ids`,
`targets`, position ids) are split this way before the forward; per-token outputs (log-probs, values) come back
split the same way and are gathered into the whole sequence before response positions are read.

Only the split and the gather are here and tested (tests/unit/test_parallel_context.py, pure tensors). cp
reaches megatron's process groups (layout.initialize) and TransformerConfig (models/hf_config.py), but the engine
does not yet split its micro-batches with these functions (nor gather the log-probs/values with autograd for the
losses), so `require_context_parallel_support` refuses cp > 1: without TransformerEngine because megatron-core's
CP attention is TE's, with it because that engine wiring is missing. The CP forward runs in TE's attention on
GPUs and is untested in this project (no GPU here).
"""
from __future__ import annotations

import torch


def cp_positions(seq_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Sequence positions held by CP rank `rank`, in the order its shard stores them."""
    if cp < 1 or not 0 <= rank < cp:
        raise ValueError(f"context-parallel rank {rank} is not in [0, cp={cp})")
    if seq_len % (2 * cp):
        raise ValueError(f"sequence length {seq_len} is not divisible by 2 x cp = {2 * cp} (pad to "
                         f"ParallelConfig.seq_multiple())")
    chunk = seq_len // (2 * cp)
    first = torch.arange(rank * chunk, (rank + 1) * chunk, device=device)
    last = torch.arange((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk, device=device)
    return torch.cat([first, last])


def split_for_context_parallel(t: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's shard of `t` along the sequence dimension `dim` (chunks rank and 2cp - 1 - rank)."""
    if cp == 1:
        return t
    return t.index_select(dim, cp_positions(t.shape[dim], cp, rank, t.device))


def merge_context_parallel_shards(shards: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """The whole sequence from every CP rank's shard (`shards[r]` from rank r): the inverse of the split."""
    cp = len(shards)
    if cp == 1:
        return shards[0]
    seq_len = shards[0].shape[dim] * cp
    order = torch.cat([cp_positions(seq_len, cp, r) for r in range(cp)])
    merged = torch.cat(shards, dim=dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len)
    return merged.index_select(dim, inverse.to(merged.device))


def gather_context_parallel(t: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather this rank's shard over the CP `group` and merge (no autograd: for log-probs/values read after
    the forward)."""
    import torch.distributed as dist

    world = dist.get_world_size(group) if group is not None else 1
    if world == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return merge_context_parallel_shards(parts, dim=dim)


def require_context_parallel_support(cp: int, role: str = "model") -> None:
    """Raise ValueError when cp > 1 cannot run: megatron-core's CP attention is TransformerEngine's, and the
    engine does not split its micro-batches over CP ranks yet (see the module docstring)."""
    from vapo_megatron.models.specs import transformer_engine_available

    if cp == 1:
        return
    if not transformer_engine_available():
        raise ValueError(f"{role}: context parallelism (cp={cp}) needs TransformerEngine attention on CUDA "
                         f"(megatron-core's local attention has no CP); TransformerEngine is not usable here. "
                         f"Set cp=1, or install transformer-engine on a GPU machine.")
    raise ValueError(f"{role}: context parallelism (cp={cp}) is not wired into the engine yet (micro-batches are "
                     f"not split over CP ranks; parallel/context.py has the split and gather). Set cp=1.")
