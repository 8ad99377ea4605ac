"""One process-group collection and one RNG-tracker state per role (issue 14). With the policy at TP=2 and the
critic at TP=1 on two ranks: each role's groups are its own, megatron's `parallel_state` globals are empty
outside the confined calls (a stray read fails instead of using the other role's groups), the two roles'
tracker states differ as set up (rank 1 is TP rank 1 for the policy, TP rank 0 for the critic), and drawing
under one role advances that role's stream only, leaving the other role's and the global tracker untouched.
A failure pinpoints parallel/layout.py: RoleLayouts / RoleGroups."""
from __future__ import annotations

import pytest

from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed


def _draw(tracker) -> list[float]:
    import torch

    with tracker.fork():  # the tensor-model-parallel stream, as TP-sharded dropout and init use it
        return torch.rand(4).tolist()


def _body() -> dict:
    from megatron.core import parallel_state, tensor_parallel

    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts

    layouts = RoleLayouts(ParallelConfig(tp=2), ParallelConfig(tp=1), seed=1234)
    policy, critic = layouts.groups["policy"], layouts.groups["critic"]
    tracker = tensor_parallel.get_cuda_rng_tracker()
    global_before = {k: v.clone() for k, v in tracker.get_states().items()}
    critic_before = {k: v.clone() for k, v in critic.rng_states.items()}
    differ = any(not (policy.rng_states[k] == critic.rng_states[k]).all() for k in policy.rng_states)
    with policy.rng():
        first = _draw(tracker)
    with policy.rng():
        second = _draw(tracker)  # continues the policy's stream
    with critic.rng():
        critic_draw = _draw(tracker)
    try:
        parallel_state.get_tensor_model_parallel_group()
        globals_empty = False
    except AssertionError:
        globals_empty = True
    with policy.megatron_globals():
        inside = parallel_state.get_tensor_model_parallel_world_size()
    return {"tp": (policy.pg.tp.size(), critic.pg.tp.size()), "tp_rank": (policy.tp_rank, critic.tp_rank),
            "differ": differ, "first": first, "second": second, "critic_draw": critic_draw,
            "global_kept": all((tracker.get_states()[k] == v).all() for k, v in global_before.items()),
            "critic_moved": any(not (critic.rng_states[k] == v).all() for k, v in critic_before.items()),
            "globals_empty": globals_empty, "tp_inside_confined_call": inside}


def test_each_role_has_its_groups_and_its_own_rng_stream():
    results = run_distributed(_body, 2)
    for rank, r in enumerate(results):
        assert r["tp"] == (2, 1)
        assert r["tp_rank"] == (rank, 0)
        assert r["globals_empty"], "parallel_state globals are set outside the confined calls"
        assert r["tp_inside_confined_call"] == 2
        assert r["global_kept"], "a role's draws leaked into the global tracker"
        assert r["critic_moved"], "the critic's draw did not advance the critic's own stream"
        assert r["first"] != r["second"], "the policy's stream restarted instead of continuing"
    # rank 1: TP rank 1 of the policy, TP rank 0 of the critic -> different tensor-parallel seeds
    assert results[1]["differ"] and results[1]["first"] != results[1]["critic_draw"]
    # rank 0 is TP rank 0 in both layouts: same seeds, as megatron derives them from the TP rank
    assert not results[0]["differ"]
