"""The parallel side of the VAPO math on gloo ranks.

- vocab-parallel log-probs and entropy (and their gradients) from TP shards equal a full-vocabulary
  log_softmax reference (failure: a wrong shard offset, a missing all-reduce, the padding mask);
- the same batch split over 1 vs 2 data-parallel ranks gives the same token-level policy loss, positive-LM
  loss, value loss, metrics and gradients when normalised by the global counts (failure: a local normaliser);
- one process-group collection and one RNG-tracker state per role (issue 14): with the policy at TP=2 and the
  critic at TP=1 on two ranks, each role's groups are its own, megatron's `parallel_state` globals are empty
  outside the confined calls (a stray read fails instead of using the other role's groups), the two roles'
  tracker states differ as set up (rank 1 is TP rank 1 for the policy, TP rank 0 for the critic), and drawing
  under one role advances that role's stream only (failure: parallel/layout.py RoleLayouts / RoleGroups).

Every check of this file runs in one spawned run per world size (`_ranks`), which the tests share.
"""
from __future__ import annotations

import functools

import pytest
import torch

from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
V, B, T = 127, 4, 12  # V odd: the last TP shard carries a padding entry


def _reference_logprobs_entropy(logits, targets, temperature):
    logp = torch.log_softmax(logits.double() / temperature, dim=-1)
    lp = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    return lp, ent


def _data():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(B, T, V, generator=g) * 3
    targets = torch.randint(0, V, (B, T), generator=g)
    w = torch.randn(2, B, T, generator=g)
    return logits, targets, w


def _vocab_parallel_body(temperature: float):
    import torch.distributed as dist

    from vapo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy

    rank, world = dist.get_rank(), dist.get_world_size()
    logits, targets, w = _data()
    per = -(-V // world)
    padded = torch.nn.functional.pad(logits, (0, per * world - V))
    shard = padded[..., rank * per:(rank + 1) * per].clone().requires_grad_(True)
    lp, ent = vocab_parallel_logprobs_entropy(shard, targets, vocab_start=rank * per, vocab_size=V,
                                              temperature=temperature, group=dist.group.WORLD)
    (w[0] * lp + w[1] * ent).sum().backward()
    return lp.detach(), ent.detach(), shard.grad


def _draw(tracker) -> list[float]:
    import torch

    with tracker.fork():  # the tensor-model-parallel stream, as TP-sharded dropout and init use it
        return torch.rand(4).tolist()


def _role_groups_body() -> dict:
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


def _all_checks_body(world: int) -> dict:
    out = {"vocab": _vocab_parallel_body(0.7), "dp": _dp_body()}
    if world == 2:
        out["roles"] = _role_groups_body()  # last: it builds the role layouts' groups
    return out


@functools.cache
def _ranks(world: int) -> list[dict]:
    """One spawned run of every check of this file on `world` gloo ranks, shared by the tests below."""
    return run_distributed(_all_checks_body, world, world)


@pytest.mark.parametrize("world", [1, 2])
def test_vocab_parallel_logprobs_entropy_match_full_softmax(world):
    temperature = 0.7
    logits, targets, w = _data()
    full = logits.clone().double().requires_grad_(True)
    ref_lp, ref_ent = _reference_logprobs_entropy(full, targets, temperature)
    (w[0] * ref_lp + w[1] * ref_ent).sum().backward()
    results = [r["vocab"] for r in _ranks(world)]
    per = -(-V // world)
    grad_pad = torch.nn.functional.pad(full.grad, (0, per * world - V))
    for rank, (lp, ent, grad) in enumerate(results):
        torch.testing.assert_close(lp.double(), ref_lp.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent.double(), ref_ent.detach(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(grad.double(), grad_pad[..., rank * per:(rank + 1) * per], atol=1e-6, rtol=1e-5)
        if rank == world - 1 and per * world > V:
            assert torch.all(grad[..., V - rank * per:] == 0), "padding entries must get no gradient"


def _batch():
    g = torch.Generator().manual_seed(1)
    lengths = torch.tensor([3, 12, 7, 1, 9, 12, 5, 2])
    mask = (torch.arange(T)[None] < lengths[:, None]).float()
    return dict(
        logprobs=torch.randn(8, T, generator=g) * 0.1 - 1, old=torch.randn(8, T, generator=g) * 0.1 - 1,
        adv=torch.randn(8, T, generator=g), values=torch.randn(8, T, generator=g),
        returns=torch.randn(8, T, generator=g), mask=mask, correct=torch.tensor([1, 0, 1, 1, 0, 0, 1, 0]).bool())


def _dp_body():
    import torch.distributed as dist

    from vapo_megatron.algorithms import explained_variance_from_stats, policy_loss, positive_lm_loss, value_loss
    from vapo_megatron.parallel.reduce import all_reduce_sum, global_counts, global_explained_variance_stats

    rank, world = dist.get_rank(), dist.get_world_size()
    full = _batch()
    per = 8 // world
    b = {k: v[rank * per:(rank + 1) * per] for k, v in full.items()}
    # two gradient-accumulation micro-batches per rank
    micro = [{k: v[i::2] for k, v in b.items()} for i in range(2)]
    counts = global_counts([m["mask"] for m in micro], [m["correct"] for m in micro])
    total = torch.zeros(6)
    lp_all = b["logprobs"].clone().requires_grad_(True)
    for i, m in enumerate(micro):
        lp = lp_all[i::2]
        pl, pm = policy_loss(lp, m["old"], m["adv"], m["mask"], global_tokens=counts["tokens"])
        nl, _ = positive_lm_loss(lp, m["mask"], m["correct"], global_correct_tokens=counts["correct_tokens"])
        vl, _ = value_loss(m["values"], m["values"], m["returns"], m["mask"], global_tokens=counts["tokens"])
        (pl + 0.1 * nl).backward()
        # metrics come already divided by the global count: summing them over micro-batches and ranks is the mean
        total += torch.stack([pl.detach(), nl.detach(), vl.detach(), pm["clip_frac_low"], pm["clip_frac_high"],
                              pm["approx_kl"]])
    grads = lp_all.grad
    all_reduce_sum(total)
    ev = explained_variance_from_stats(global_explained_variance_stats(
        [m["returns"] for m in micro], [m["values"] for m in micro], [m["mask"] for m in micro]))
    full_grads = [torch.zeros_like(grads) for _ in range(world)]
    dist.all_gather(full_grads, grads)
    order = torch.cat([torch.arange(r * per, (r + 1) * per) for r in range(world)])
    return total, ev, torch.cat(full_grads)[order.argsort()]


def test_dp_split_invariance():
    one = _ranks(1)[0]["dp"]
    two = [r["dp"] for r in _ranks(2)]
    for res in two:
        for a, b in zip(res, one):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_each_role_has_its_groups_and_its_own_rng_stream():
    results = [r["roles"] for r in _ranks(2)]
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
