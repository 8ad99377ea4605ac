"""Decoupled PPO's correction against a slow per-token reference, and the bounded-staleness schedule simulated:
a failure pinpoints algorithms/off_policy.py or rollout/async_pool.py `may_generate`."""
from __future__ import annotations

import math

import pytest
import torch

from vapo_megatron.algorithms.off_policy import decoupled_ppo_loss, off_policy_metrics


def _reference(lp, prox, behav, adv, mask, cap, eps_low, eps_high):
    total, count = 0.0, 0
    for b in range(len(lp)):
        for t in range(len(lp[0])):
            if not mask[b][t]:
                continue
            w = min(math.exp(prox[b][t] - behav[b][t]), cap) if cap is not None else 1.0
            rho = math.exp(lp[b][t] - prox[b][t])
            a = adv[b][t]
            total += w * max(-a * rho, -a * min(max(rho, 1 - eps_low), 1 + eps_high))
            count += 1
    return total / count


@pytest.mark.parametrize("cap", [None, 1.5, 3.0])
def test_decoupled_ppo_matches_per_token_reference(cap):
    g = torch.Generator().manual_seed(0)
    shape = (4, 7)
    prox = -torch.rand(shape, generator=g, dtype=torch.float64) * 3
    behav = prox + torch.randn(shape, generator=g, dtype=torch.float64) * 0.6   # stale sampler
    lp = (prox + torch.randn(shape, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    adv = torch.randn(shape, generator=g, dtype=torch.float64)
    mask = (torch.rand(shape, generator=g) > 0.25).double()
    loss, metrics = decoupled_ppo_loss(lp, prox, behav, adv, mask, cap=cap, eps_low=0.2, eps_high=0.28)
    ref = _reference(lp.tolist(), prox.tolist(), behav.tolist(), adv.tolist(), mask.tolist(), cap, 0.2, 0.28)
    assert loss.item() == pytest.approx(ref, rel=1e-10)
    loss.backward()
    eps, i, j = 1e-6, 1, 2
    while not mask[i, j]:
        j += 1
    bumped = lp.detach().clone()
    bumped[i, j] += eps
    num = (_reference(bumped.tolist(), prox.tolist(), behav.tolist(), adv.tolist(), mask.tolist(), cap, 0.2, 0.28)
           - ref) / eps
    assert lp.grad[i, j].item() == pytest.approx(num, rel=1e-4, abs=1e-8)
    assert ("tis_ratio_mean" in metrics) == (cap is not None)


def test_off_policy_metrics():
    prox = torch.zeros(2, 3)
    behav = torch.log(torch.tensor([[0.5, 1.0, 4.0], [1.0, 1.0, 1.0]]))  # weights 2, 1, 0.25, 1, 1, (masked)
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    m = off_policy_metrics(torch.tensor([3, 2]), 4, prox, behav, mask, cap=1.5)
    assert m["staleness_max"] == 2 and m["staleness_mean"] == 1.5
    assert m["behaviour_weight_max"] == pytest.approx(2.0) and m["behaviour_weight_min"] == pytest.approx(0.25)
    assert m["behaviour_weight_mean"] == pytest.approx(5.25 / 5)
    assert m["behaviour_weight_capped_frac"] == pytest.approx(0.2)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_schedule_never_trains_a_sample_older_than_k(k):
    """Simulate the protocol: the trainer requests batch s, trains, pushes version s; the pool generates what
    `may_generate` allows after each answer. Every batch trained at step s (trainer version s - 1) was sampled
    by a version >= s - 1 - k; with k > 0 the pool does run ahead (the overlap)."""
    from vapo_megatron.rollout.async_pool import may_generate

    last, version, generated, sampled_by, ahead = 12, 0, 0, {}, 0
    for step in range(1, last + 1):
        while generated < step:  # the request: batch `step` must exist
            generated += 1
            sampled_by[generated] = version
        while may_generate(generated + 1, step, k, last):
            generated += 1
            sampled_by[generated] = version
            ahead += 1
        assert (step - 1) - sampled_by[step] <= k
        version += 1  # trained, pushed
    assert generated == last
    assert max((s - 1) - sampled_by[s] for s in range(1, last + 1)) == k
    assert (ahead > 0) == (k > 0)
