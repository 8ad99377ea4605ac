"""Context parallelism (CP): which sequence positions a CP rank holds, and putting per-token results back together.

megatron-core's load balancing for causal attention: the sequence is cut into 2 * cp equal chunks and CP rank r
holds chunks r and 2cp - 1 - r (an early, cheap chunk with a late, expensive one). The engine's schedule
(engine/schedule.py) splits each micro-batch's `input_ids`, position ids and `targets` this way before the forward;
megatron's RoPE slices its table the same way (rope_utils.get_pos_emb_on_this_cp_rank). Attention needs the keys
and values of the whole sequence: TransformerEngine's ring attention on GPUs, or, with megatron-core's local spec
(CPU, no TE), `models/cp_attention.py`, which all-gathers them. Per-token outputs (log-probs, entropies, values)
come back split and are gathered into the whole sequence *with autograd* (`gather_sequence`) before the losses
read response positions, so every loss sees whole sequences and the pure math (algorithms/) needs no CP case.

A packed (THD) micro-batch is split per sequence slot instead (`packed_cp_positions`: chunks r and 2cp-1-r of every
slot), the layout megatron-core's THD RoPE and TransformerEngine's THD attention expect.

Gradient bookkeeping: after the gather every CP rank computes the same whole-sequence loss; the schedule divides
it by cp, the gather's backward (reduce-scatter) sums the cp copies of each shard's gradient (cp x 1/cp = 1), and
megatron's DDP sums parameter gradients over the data-parallel x context-parallel group. Tested against cp = 1 in
tests/distributed/test_context_parallel.py; the split and merge alone in tests/unit/test_parallel_context.py.
"""
from __future__ import annotations

from typing import Any

import torch

from vapo_megatron.data.rl_batch import MicroBatch


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


def packed_cp_positions(cu_seqlens_padded: list[int], cp: int, rank: int, device=None) -> torch.Tensor:
    """Stream positions held by CP rank `rank` of a packed (THD) stream: every sequence slot [a, b) split on its
    own (chunks rank and 2cp - 1 - rank of each slot, in slot order), as megatron-core's THD layout and
    TransformerEngine's `thd_get_partitioned_indices` split it; RoPE (rope_utils._apply_rotary_pos_emb_thd)
    assumes this layout."""
    return torch.cat([a + cp_positions(b - a, cp, rank, device) for a, b in zip(cu_seqlens_padded[:-1],
                                                                                 cu_seqlens_padded[1:])])


def _positions(seq_len: int, cp: int, rank: int, cu_seqlens_padded, device=None) -> torch.Tensor:
    if cu_seqlens_padded is None:
        return cp_positions(seq_len, cp, rank, device)
    return packed_cp_positions([int(x) for x in cu_seqlens_padded], cp, rank, device)


def split_for_context_parallel(t: torch.Tensor, cp: int, rank: int, dim: int = 1,
                               cu_seqlens_padded=None) -> torch.Tensor:
    """This CP rank's shard of `t` along the sequence dimension `dim` (chunks rank and 2cp - 1 - rank; of every
    sequence slot when `cu_seqlens_padded` describes a packed stream)."""
    if cp == 1:
        return t
    return t.index_select(dim, _positions(t.shape[dim], cp, rank, cu_seqlens_padded, t.device))


def cp_key_positions(seq_len: int, cp: int, device=None, cu_seqlens_padded=None) -> torch.Tensor:
    """Sequence positions of every CP rank's shard laid end to end (rank 0's shard first), as an all-gather
    returns them."""
    return torch.cat([_positions(seq_len, cp, r, cu_seqlens_padded, device) for r in range(cp)])


def merge_context_parallel_shards(shards: list[torch.Tensor], dim: int = 1,
                                  cu_seqlens_padded=None) -> torch.Tensor:
    """The whole sequence from every CP rank's shard (`shards[r]` from rank r): the inverse of the split.
    Differentiable (a concatenation and an index_select)."""
    cp = len(shards)
    if cp == 1:
        return shards[0]
    seq_len = shards[0].shape[dim] * cp
    order = cp_key_positions(seq_len, cp, cu_seqlens_padded=cu_seqlens_padded)
    merged = torch.cat(shards, dim=dim)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len)
    return merged.index_select(dim, inverse.to(merged.device))


def cp_causal_mask(local_len: int, cp: int, rank: int, device=None) -> torch.Tensor:
    """Boolean [1, 1, local_len, cp * local_len] mask (True = masked) of this rank's queries against the
    all-gathered keys: a query at sequence position i sees keys at positions <= i (right padding included, as in
    engine/schedule.causal_mask)."""
    seq_len = local_len * cp
    q = cp_positions(seq_len, cp, rank, device)
    k = cp_key_positions(seq_len, cp, device)
    return (k[None, :] > q[:, None])[None, None]


def context_parallel_view(mb: MicroBatch, cp: int, rank: int, group: Any) -> MicroBatch:
    """The micro-batch as the loss of CP rank `rank` sees it: `targets` split like the model's input, and
    `cp_group` = (cp, group) for `gather_sequence_of`. Everything else (response positions, masks, per-token
    inputs of the losses) stays whole-sequence."""
    targets = None if mb.targets is None else split_for_context_parallel(mb.targets, cp, rank,
                                                                          cu_seqlens_padded=mb.cu_seqlens_padded)
    return mb.replace(targets=targets, cp_group=(cp, group))


def gather_sequence_of(t: torch.Tensor, mb: MicroBatch, dim: int = 1) -> torch.Tensor:
    """`t` over the whole sequence (the whole packed stream) for a micro-batch from `context_parallel_view`
    (unchanged without CP)."""
    if mb.cp_group is None:
        return t
    return gather_sequence(t, *mb.cp_group, dim=dim, cu_seqlens_padded=mb.cu_seqlens_padded)


def gather_sequence(t: torch.Tensor, cp: int, group, dim: int = 1, cu_seqlens_padded=None) -> torch.Tensor:
    """All-gather this rank's shard of `t` over the CP `group` and merge into the whole sequence, *with
    autograd*: the backward reduce-scatters (sums) the gradients of the copies back to each shard's owner."""
    if cp == 1:
        return t
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    moved = t.movedim(dim, 0).contiguous()
    gathered = gather_from_sequence_parallel_region(moved, tensor_parallel_output_grad=True, group=group)
    return merge_context_parallel_shards(list(gathered.chunk(cp, dim=0)), dim=0,
                                         cu_seqlens_padded=cu_seqlens_padded).movedim(0, dim)
