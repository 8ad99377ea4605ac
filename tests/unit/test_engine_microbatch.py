"""The token-budget split of engine/microbatch.py as pure functions: every row lands in exactly one micro-batch,
the budget holds (except a single over-long row), the order is deterministic, and trimming keeps each row's
tokens. A failure pinpoints the packing itself, before any model runs (the end-to-end equality of losses and
gradients is tests/distributed/test_token_microbatches.py)."""
from __future__ import annotations

import torch

from vapo_megatron.engine.microbatch import padded_and_real_tokens, round_up, split_micro_batches, token_budget_groups
from vapo_megatron.testing.engines import synthetic_rl_batch


def test_groups_cover_every_row_once_within_budget():
    lens = [30, 5, 17, 5, 64, 9, 30, 1, 12]
    groups = token_budget_groups(lens, budget=64, pad_multiple=8)
    assert sorted(i for g in groups for i in g) == list(range(len(lens)))
    for g in groups:
        padded = len(g) * round_up(max(lens[i] for i in g), 8)
        assert padded <= 64 or len(g) == 1, (g, padded)
    assert groups == token_budget_groups(lens, budget=64, pad_multiple=8)
    assert groups[0] == [4] and groups[1] == [0, 6]  # longest first, ties by index


def test_row_longer_than_budget_goes_alone():
    assert token_budget_groups([100, 3, 3], budget=16, pad_multiple=8) == [[0], [1, 2]]


def test_trimmed_micro_batches_keep_every_token_and_cut_padding():
    batch = synthetic_rl_batch(12, 64, seed=0)
    micro, rows = split_micro_batches(batch, micro_batch_size=4, micro_batch_tokens=48, pad_multiple=8)
    for mb, r in zip(micro, rows):
        width = mb.input_ids.shape[1]
        assert width % 8 == 0 and int(mb.seq_lens.max()) <= width
        assert torch.equal(mb.input_ids, batch.input_ids[r, :width])
        assert int(mb.resp_pos.max()) < width
    fixed, _ = split_micro_batches(batch, micro_batch_size=4, micro_batch_tokens=0, pad_multiple=8)
    (p_tok, real_tok), (p_fix, real_fix) = padded_and_real_tokens(micro), padded_and_real_tokens(fixed)
    assert real_tok == real_fix == int(batch.seq_lens.sum()) and p_tok < p_fix
