"""Sequence packing (THD layout): which rows share a micro-batch, and where each row sits in the packed stream.

A packed micro-batch lays its rows end to end in one stream of T tokens (batch dimension 1) instead of a padded
[m, S] block; `cu_seqlens` (cumulative lengths, [m + 1]) tells attention where each sequence starts, so a token
attends only to earlier tokens of its own sequence (megatron-core's `PackedSeqParams`, qkv_format "thd").

Padding left in a packed stream, and why:
- context parallelism (cp > 1) splits *every sequence* into 2 x cp chunks (rank r holds chunks r and 2cp-1-r, as
  megatron-core's THD split and TransformerEngine's `thd_get_partitioned_indices` do), so each sequence is padded
  to a multiple of 2 x cp (`cu_seqlens_padded`; `cu_seqlens` keeps the real lengths);
- sequence parallelism splits the stream over the TP ranks and the CP split divides it by cp, so the stream ends
  with one padding segment that makes T a multiple of `ParallelConfig.seq_multiple()` (a segment of its own in
  `cu_seqlens`: it attends only to itself and no loss reads it).

Micro-batches by token budget: first-fit decreasing (longest row first, into the first micro-batch it fits;
ties by row index, so every rank computes the same split), then micro-batches are split until every data-parallel
rank has the same count (pipeline schedules run the same number of micro-batches on every rank).
Pure: tensors and lists in, tensors and lists out; no megatron, no torch.distributed.
"""
from __future__ import annotations

import torch

from vapo_megatron.data.rl_batch import MicroBatch


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def first_fit_decreasing(lengths: list[int], budget: int) -> list[list[int]]:
    """Row indices of each bin: rows sorted longest first (ties by index) go into the first bin whose token sum
    stays <= `budget`, else a new bin. A row longer than the budget gets a bin of its own (a sequence is never
    split). Bins are returned in creation order, their rows in insertion order."""
    if budget <= 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    bins: list[list[int]] = []
    loads: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for b, load in enumerate(loads):
            if load + lengths[i] <= budget:
                bins[b].append(i)
                loads[b] += lengths[i]
                break
        else:
            bins.append([i])
            loads.append(lengths[i])
    return bins


def split_to_count(bins: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """`bins` split until there are `count` of them: the bin with the most tokens (of those holding two or more
    rows) is cut in two by first-fit decreasing at half its load. Raises when fewer than `count` rows exist."""
    bins = [list(b) for b in bins]
    if count > sum(len(b) for b in bins):
        raise ValueError(f"cannot make {count} micro-batches from {sum(len(b) for b in bins)} rows")
    while len(bins) < count:
        load = [sum(lengths[i] for i in b) if len(b) > 1 else -1 for b in bins]
        big = bins.pop(load.index(max(load)))
        half = first_fit_decreasing([lengths[i] for i in big], max(1, -(-load[load.index(max(load))] // 2)))
        while len(half) > 2:  # merge the tail into the second half: exactly two parts
            half[1].extend(half.pop())
        bins.extend([[big[j] for j in part] for part in half])
    return bins


def balanced_token_bins(lengths: list[int], budget: int, dp: int) -> list[list[list[int]]]:
    """Token-budget bins of each data-parallel rank's contiguous slice of `lengths` (rank r holds rows
    [r * n/dp, (r+1) * n/dp), as the engines split), all with the same number of bins (the largest count over
    ranks). Row indices are local to each slice. Every rank holds every length, so each computes all slices'
    bins and agrees on the count without a collective."""
    n = len(lengths)
    if n % dp:
        raise ValueError(f"{n} rows do not split over data-parallel size {dp}")
    per = n // dp
    slices = [lengths[r * per:(r + 1) * per] for r in range(dp)]
    bins = [first_fit_decreasing(s, budget) for s in slices]
    count = max(len(b) for b in bins)
    return [split_to_count(b, s, count) for b, s in zip(bins, slices)]


def packed_offsets(seq_lens: list[int], seq_multiple: int, total_multiple: int) -> tuple[list[int], list[int]]:
    """(cu_seqlens, cu_seqlens_padded) of rows packed in this order, TransformerEngine's convention: each row's
    slot is its length rounded up to `seq_multiple` (`cu_seqlens_padded`: cumulative slot lengths, the stream's
    layout), `cu_seqlens` the cumulative real lengths. A final padding segment (when needed) rounds the stream
    up to `total_multiple`; it counts as a sequence in both lists with its full length."""
    real, slots = list(seq_lens), [round_up(n, seq_multiple) for n in seq_lens]
    tail = round_up(sum(slots), total_multiple) - sum(slots)
    if tail:
        real.append(tail)
        slots.append(tail)
    cu_real, cu_padded = [0], [0]
    for n, s in zip(real, slots):
        cu_real.append(cu_real[-1] + n)
        cu_padded.append(cu_padded[-1] + s)
    return cu_real, cu_padded


def pack_rows(rows: torch.Tensor, seq_lens: list[int], cu_padded: list[int], pad_id: int | torch.Tensor = 0
              ) -> torch.Tensor:
    """[1, T, ...] stream of `rows` ([m, S, ...] right-padded, m <= len(cu_padded) - 1): row k's first
    seq_lens[k] positions at cu_padded[k], `pad_id` elsewhere (a number, or a tensor of the trailing shape)."""
    out = torch.empty((1, cu_padded[-1], *rows.shape[2:]), dtype=rows.dtype, device=rows.device)
    out[:] = torch.as_tensor(pad_id, dtype=rows.dtype, device=rows.device)
    for k, n in enumerate(seq_lens):
        out[0, cu_padded[k]:cu_padded[k] + n] = rows[k, :n]
    return out


def packed_position_ids(cu_padded: list[int], device=None) -> torch.Tensor:
    """[1, T] position of each token within its own sequence slot."""
    return torch.cat([torch.arange(b - a, device=device) for a, b in zip(cu_padded[:-1], cu_padded[1:])])[None]


def pack_micro_batch(mb: MicroBatch, seq_multiple: int = 1, total_multiple: int = 1) -> MicroBatch:
    """The packed form of a padded micro-batch (rows [m, S'], `seq_lens` long): `input_ids` and `targets` become
    one stream [1, T], `resp_pos` is shifted by each row's slot offset (padded response slots, masked out of every
    loss, are clamped into the stream), `cu_seqlens` / `cu_seqlens_padded` are set. Per-row fields are kept."""
    # a batch without `seq_lens` (tests' and tools' dict batches): every row is taken whole, padding included
    lens = mb.seq_lens.tolist() if mb.seq_lens is not None else [mb.input_ids.shape[1]] * mb.input_ids.shape[0]
    cu_real, cu_padded = packed_offsets(lens, seq_multiple, total_multiple)
    changes = {"input_ids": pack_rows(mb.input_ids, lens, cu_padded),
               "cu_seqlens": torch.tensor(cu_real, dtype=torch.int32),
               "cu_seqlens_padded": torch.tensor(cu_padded, dtype=torch.int32)}
    if mb.targets is not None:
        changes["targets"] = pack_rows(mb.targets, lens, cu_padded)
    if mb.routed_experts is not None:  # padding positions route to experts 0..k-1 (distinct; no loss reads them)
        k = mb.routed_experts.shape[-1]
        changes["routed_experts"] = pack_rows(mb.routed_experts, lens, cu_padded, torch.arange(k))
    if mb.resp_pos is not None:
        offsets = torch.tensor(cu_padded[:len(lens)], dtype=mb.resp_pos.dtype, device=mb.resp_pos.device)
        changes["resp_pos"] = (mb.resp_pos + offsets[:, None]).clamp(max=cu_padded[-1] - 1)
    return mb.replace(**changes)


def real_token_mask(mb: MicroBatch) -> torch.Tensor:
    """[b, S] bool (packed: [1, T]): the positions of a micro-batch that hold a row's prompt or response tokens,
    not padding (all positions when the micro-batch has no `seq_lens`)."""
    ids = mb.input_ids
    if mb.seq_lens is None:
        return torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    lens = mb.seq_lens.to(ids.device)
    if not mb.packed:
        return torch.arange(ids.shape[1], device=ids.device)[None] < lens[:, None]
    out = torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    for start, n in zip(mb.cu_seqlens_padded.tolist(), lens.tolist()):  # rows only, not the final padding segment
        out[0, start:start + n] = True
    return out
