"""Context-parallel split and gather (parallel/context.py) as pure functions: split + merge is the identity, each
rank holds chunks r and 2cp-1-r, and per-token log-probs computed on the shards and merged equal those of the
whole sequence, and the all-gather attention's mask is causal in whole-sequence positions. A failure pinpoints the
position bookkeeping; the CP forward and backward through megatron are tested in
tests/distributed/test_context_parallel.py."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.parallel.context import (
    cp_causal_mask,
    cp_positions,
    merge_context_parallel_shards,
    split_for_context_parallel,
)


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_split_then_merge_is_identity(cp):
    t = torch.randn(3, 16 * cp, 5)
    shards = [split_for_context_parallel(t, cp, r) for r in range(cp)]
    assert all(s.shape == (3, 16, 5) for s in shards)
    assert torch.equal(merge_context_parallel_shards(shards), t)


def test_rank_holds_chunks_r_and_mirror():
    assert cp_positions(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert cp_positions(8, 2, 1).tolist() == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="not divisible by 2 x cp = 4"):
        cp_positions(10, 2, 0)


@pytest.mark.parametrize("cp", [2, 4])
def test_sharded_logprobs_merge_to_the_unsplit_ones(cp):
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(2, 8 * cp, 50, generator=g), torch.randint(0, 50, (2, 8 * cp), generator=g)

    def logprobs(lg, tg):
        return torch.log_softmax(lg, -1).gather(-1, tg[..., None])[..., 0]

    shards = [logprobs(split_for_context_parallel(logits, cp, r), split_for_context_parallel(targets, cp, r))
              for r in range(cp)]
    assert torch.equal(merge_context_parallel_shards(shards), logprobs(logits, targets))


@pytest.mark.parametrize("cp", [1, 2, 3])
def test_cp_mask_is_causal_attention_over_the_shards(cp):
    """Attention of one rank's queries against the gathered keys with cp_causal_mask equals the rows of plain
    causal attention over the whole sequence at that rank's positions."""
    seq, d = 4 * cp, 6
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(seq, d, generator=g) for _ in range(3))
    full_mask = torch.triu(torch.ones(seq, seq, dtype=torch.bool), 1)
    ref = torch.softmax((q @ k.T).masked_fill(full_mask, float("-inf")), -1) @ v
    k_all = torch.cat([split_for_context_parallel(k, cp, r, dim=0) for r in range(cp)])
    v_all = torch.cat([split_for_context_parallel(v, cp, r, dim=0) for r in range(cp)])
    for r in range(cp):
        q_r = split_for_context_parallel(q, cp, r, dim=0)
        mask = cp_causal_mask(seq // cp, cp, r)[0, 0]
        out = torch.softmax((q_r @ k_all.T).masked_fill(mask, float("-inf")), -1) @ v_all
        torch.testing.assert_close(out, ref[cp_positions(seq, cp, r)])
