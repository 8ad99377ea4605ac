"""Sequence packing's bookkeeping (data/packing.py, the packed CP split of parallel/context.py): which rows share a
micro-batch, where each row's tokens sit in the stream, and that a packed micro-batch reads the same tokens at its
response positions as the padded one. A failure pinpoints a lost or duplicated row, a bin over budget, unequal
micro-batch counts over DP ranks, a wrong slot offset or an unaligned CP slot."""
from __future__ import annotations

import random

import pytest
import torch

from vapo_megatron.data.packing import (
    balanced_token_bins,
    first_fit_decreasing,
    pack_micro_batch,
    packed_offsets,
    packed_position_ids,
    real_token_mask,
    split_to_count,
)
from vapo_megatron.data.rl_batch import RLBatch
from vapo_megatron.engine.microbatch import padded_and_real_tokens, split_micro_batches
from vapo_megatron.parallel.context import (
    merge_context_parallel_shards,
    packed_cp_positions,
    split_for_context_parallel,
)
from vapo_megatron.testing.engines import synthetic_rl_batch


def _check_bins(bins, lengths, budget):
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths))), "every row exactly once"
    for b in bins:
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget, (b, [lengths[i] for i in b])


def test_first_fit_decreasing_fills_earlier_bins_and_keeps_long_rows_alone():
    assert first_fit_decreasing([5, 9, 3, 4, 100], budget=12) == [[4], [1, 2], [0, 3]]
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(1, 60) for _ in range(rng.randint(1, 40))]
        bins = first_fit_decreasing(lengths, budget=64)
        _check_bins(bins, lengths, 64)
        # first fit never opens a bin while an earlier one is at most half full: at most one such bin
        loads = [sum(lengths[i] for i in b) for b in bins]
        assert sum(load <= 32 for load in loads) <= 1, loads
    with pytest.raises(ValueError, match="must be > 0"):
        first_fit_decreasing([1], budget=0)


def test_split_to_count_and_balanced_bins_give_every_rank_the_same_count():
    lengths = [60, 50, 55, 40, 2, 3, 1, 4]
    bins = balanced_token_bins(lengths, budget=64, dp=2)
    assert len(bins[0]) == len(bins[1]) == 4  # rank 0's long rows need 4 bins; rank 1's short rows 1, split to 4
    for rank, b in enumerate(bins):
        _check_bins(b, lengths[rank * 4:(rank + 1) * 4], 64)
    assert len(split_to_count([[0, 1, 2]], [5, 5, 5], 3)) == 3
    with pytest.raises(ValueError, match="cannot make 4 micro-batches from 3 rows"):
        split_to_count([[0, 1, 2]], [5, 5, 5], 4)
    with pytest.raises(ValueError, match="do not split over data-parallel size 3"):
        balanced_token_bins(lengths, 64, dp=3)


def test_packed_offsets_pad_slots_for_cp_and_end_the_stream_on_the_multiple():
    assert packed_offsets([5, 3], 1, 1) == ([0, 5, 8], [0, 5, 8])
    cu, cu_padded = packed_offsets([5, 3], 4, 16)  # CP=2: slots of 8 and 4, then a tail slot of 4
    assert cu_padded == [0, 8, 12, 16] and cu == [0, 5, 8, 12]
    assert packed_position_ids(cu_padded).tolist() == [list(range(8)) + list(range(4)) + list(range(4))]


@pytest.mark.parametrize("cp", [1, 2])
def test_packed_micro_batch_reads_the_same_tokens_as_the_padded_one(cp):
    batch = synthetic_rl_batch(6, vocab=64, seed=3)
    padded = batch.micro_batch([4, 1, 2])
    packed = pack_micro_batch(padded, 2 * cp if cp > 1 else 1, 8)
    assert packed.packed and packed.input_ids.shape[0] == 1 and packed.input_ids.shape[1] % 8 == 0
    mask = padded.resp_mask.bool()
    for k in range(3):
        real = mask[k]
        assert torch.equal(padded.input_ids[k].gather(0, padded.resp_pos[k][real] + 1),
                           packed.input_ids[0].gather(0, packed.resp_pos[k][real] + 1))
        assert torch.equal(padded.targets[k].gather(0, padded.resp_pos[k][real]),
                           packed.targets[0].gather(0, packed.resp_pos[k][real]))
    slots = packed.cu_seqlens_padded.tolist()
    assert all((b - a) % (2 * cp if cp > 1 else 1) == 0 for a, b in zip(slots[:-1], slots[1:]))
    (p_pad, real_pad), (p_pack, real_pack) = padded_and_real_tokens([padded]), padded_and_real_tokens([packed])
    assert real_pad == real_pack == int(padded.seq_lens.sum()) and p_pack < p_pad


def test_routed_experts_follow_their_tokens_into_the_stream_and_padding_is_marked():
    """Routing replay's per-token experts are packed like the tokens; padding positions name experts 0..k-1, and
    `real_token_mask` marks exactly each row's prompt + response tokens (padded and packed)."""
    batch = synthetic_rl_batch(5, vocab=64, seed=4)
    n, width = batch.input_ids.shape
    batch.routed_experts = torch.randint(0, 8, (n, width, 3, 2), generator=torch.Generator().manual_seed(1)).to(
        torch.uint8)
    padded = batch.micro_batch([3, 0, 4])
    packed = pack_micro_batch(padded, 4, 16)
    assert packed.routed_experts.shape == (1, packed.input_ids.shape[1], 3, 2)
    real_padded, real_packed = real_token_mask(padded), real_token_mask(packed)
    for k, row in enumerate([3, 0, 4]):
        n_tok, start = int(batch.seq_lens[row]), int(packed.cu_seqlens_padded[k])
        assert torch.equal(packed.routed_experts[0, start:start + n_tok], batch.routed_experts[row, :n_tok])
        assert real_padded[k].tolist() == [i < n_tok for i in range(padded.input_ids.shape[1])]
        assert real_packed[0, start:start + n_tok].all()
    assert int(real_packed.sum()) == int(real_padded.sum()) == int(padded.seq_lens.sum())
    pad = packed.routed_experts[0][~real_packed[0]]
    assert len(pad) and (pad == torch.tensor([0, 1], dtype=torch.uint8)).all()


def test_split_micro_batches_packs_every_row_once():
    batch = synthetic_rl_batch(8, vocab=64, seed=5)
    micro, rows = split_micro_batches(batch, micro_batch_size=4, micro_batch_tokens=40, pad_multiple=1, pack=True)
    assert sorted(i for r in rows for i in r) == list(range(8))
    assert all(mb.packed and mb.input_ids.shape[1] == int(mb.seq_lens.sum()) for mb in micro)
    fixed, rows = split_micro_batches(batch, micro_batch_size=4, micro_batch_tokens=0, pad_multiple=8, pack=True)
    assert rows == [[0, 1, 2, 3], [4, 5, 6, 7]] and all(mb.input_ids.shape[1] % 8 == 0 for mb in fixed)


def test_packed_cp_split_takes_chunks_of_every_slot_and_merges_back():
    cu_padded = [0, 8, 12, 20]
    assert packed_cp_positions(cu_padded, 2, 0).tolist() == [0, 1, 6, 7, 8, 11, 12, 13, 18, 19]
    assert packed_cp_positions(cu_padded, 2, 1).tolist() == [2, 3, 4, 5, 9, 10, 14, 15, 16, 17]
    t = torch.arange(20.0)[None]
    shards = [split_for_context_parallel(t, 2, r, cu_seqlens_padded=cu_padded) for r in range(2)]
    assert torch.equal(merge_context_parallel_shards(shards, cu_seqlens_padded=cu_padded), t)


def test_packing_is_on_where_supported_and_refused_where_not():
    from vapo_megatron.engine.model_engine import packing_enabled

    assert packing_enabled(None, torch.float32, te_attention=False)  # the local THD attention: any dtype
    assert packing_enabled(None, torch.bfloat16, te_attention=True)
    assert not packing_enabled(None, torch.float32, te_attention=True)  # default: padded where TE cannot pack
    assert not packing_enabled(False, torch.bfloat16, te_attention=False)
    with pytest.raises(ValueError, match="flash/fused backends, which need bfloat16"):
        packing_enabled(True, torch.float32, te_attention=True)


def test_rows_without_padding_pack_end_to_end():
    ids = torch.arange(12).reshape(3, 4)
    batch = RLBatch.from_tensors(ids, [2, 2, 2], torch.ones(3, 2))
    micro, _ = split_micro_batches(batch, micro_batch_size=3, micro_batch_tokens=0, pad_multiple=1, pack=True)
    assert micro[0].input_ids.tolist() == [list(range(12))] and micro[0].cu_seqlens_padded.tolist() == [0, 4, 8, 12]
    assert micro[0].resp_pos.tolist() == [[1, 2], [5, 6], [9, 10]]
