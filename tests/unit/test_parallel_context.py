"""Context-parallel split and gather (parallel/context.py) as pure functions: split + merge is the identity, each
rank holds chunks r and 2cp-1-r, and per-token log-probs computed on the shards and merged equal those of the
whole sequence. A failure pinpoints the position bookkeeping; the CP forward itself needs TransformerEngine on a
GPU and is not tested here."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.parallel.context import (
    cp_positions,
    merge_context_parallel_shards,
    require_context_parallel_support,
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


def test_cp_without_transformer_engine_is_refused():
    from vapo_megatron.models.specs import transformer_engine_available

    if transformer_engine_available():
        pytest.skip("TransformerEngine present")
    require_context_parallel_support(1)
    with pytest.raises(ValueError, match=r"context parallelism \(cp=2\) needs TransformerEngine"):
        require_context_parallel_support(2, "policy")
