"""Splitting one data-parallel rank's share of a mini-batch into micro-batches: a fixed number of rows, or a token
budget (`train.micro_batch_tokens`) that packs rows of similar length together and trims each micro-batch's
padding to its own longest row.

Why the split cannot change the result: every loss is normalised by counts of the whole mini-batch
(engine/schedule.py, algorithms/), gradients are summed over micro-batches, and right padding never reaches a real
token under the causal mask; so only float rounding differs (tests/distributed/test_token_microbatches.py).

Why no collective is needed to agree on the split: the ranks that exchange activations within one micro-batch (the
TP, PP and CP peers) hold the same data-parallel slice and compute the same split from it; data-parallel peers
meet only in the gradient reduction after all their micro-batches, so their counts and lengths may differ.
Pipeline stages receive each micro-batch's shape with it (megatron's `variable_seq_lengths`).

Packing (`train.pack_sequences`, data/packing.py) lays each micro-batch's rows end to end in one stream with
cumulative sequence lengths, so the model computes (almost) no padding; the same argument holds (attention stays
within each sequence)."""
from __future__ import annotations

from vapo_megatron.data.packing import first_fit_decreasing, pack_micro_batch, round_up
from vapo_megatron.data.rl_batch import MicroBatch, RLBatch


def token_budget_groups(seq_lens: list[int], budget: int, pad_multiple: int) -> list[list[int]]:
    """Row indices of each micro-batch. Rows are sorted longest first (ties by index: deterministic) and packed
    greedily while rows x round_up(longest row, pad_multiple) <= budget. A row longer than the budget on its own
    gets a micro-batch of its own (a sequence is never split)."""
    if budget <= 0:
        raise ValueError(f"token budget must be > 0, got {budget}")
    groups: list[list[int]] = []
    for i in sorted(range(len(seq_lens)), key=lambda i: (-seq_lens[i], i)):
        if groups and (len(groups[-1]) + 1) * round_up(seq_lens[groups[-1][0]], pad_multiple) <= budget:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def split_micro_batches(local: RLBatch, *, micro_batch_size: int, micro_batch_tokens: int, pad_multiple: int,
                        pack: bool = False, cp: int = 1, rows: list[list[int]] | None = None
                        ) -> tuple[list[MicroBatch], list[list[int]]]:
    """This rank's micro-batches and, for each, the local row indices it holds (to put outputs back in order).
    Fixed mode keeps row order and the full width; token mode needs `seq_lens` (prompt + response tokens) and cuts
    each micro-batch to its longest row (`resp_pos` of padded response slots, which may point past that width, is
    clamped into it: those slots are masked out of every loss and metric). `targets` and `resp_pos` are derived
    here, for each micro-batch's rows only.

    `pack`: each micro-batch's rows are packed into one stream (data/packing.py: each row's slot padded to 2 x cp
    under context parallelism, the stream to `pad_multiple`); with a token budget the rows of each micro-batch are
    `rows` when given (the engine passes bins balanced over data-parallel ranks), else first-fit decreasing
    bins of this slice."""
    n, width = local.input_ids.shape
    take = local.micro_batch
    if micro_batch_tokens <= 0:
        m = min(micro_batch_size, n)
        rows = [list(range(i, min(i + m, n))) for i in range(0, n, m)]
        micro = [take(slice(r[0], r[-1] + 1)) for r in rows]
    elif pack:
        rows = rows or first_fit_decreasing(local.seq_lens.tolist(), micro_batch_tokens)
        micro = [take(r) for r in rows]
    else:
        lens = local.seq_lens.tolist()
        rows = token_budget_groups(lens, micro_batch_tokens, pad_multiple)
        micro = [take(r, min(width, round_up(max(lens[i] for i in r), pad_multiple))) for r in rows]
    if pack:
        micro = [pack_micro_batch(mb, 2 * cp if cp > 1 else 1, pad_multiple) for mb in micro]
    return micro, rows


def padded_and_real_tokens(micro_batches: list[MicroBatch]) -> tuple[int, int]:
    """Token slots the model computes (rows x width, summed) and how many of them hold prompt or response."""
    padded = sum(mb.input_ids.numel() for mb in micro_batches)
    real = sum(int(mb.seq_lens.sum()) for mb in micro_batches) if micro_batches and \
        micro_batches[0].seq_lens is not None else padded
    return padded, real
