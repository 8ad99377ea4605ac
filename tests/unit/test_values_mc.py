"""Step boundaries, step token values, the probe's rows, `ev_oracle` and `ev_ceiling` (values/), each against a slow,
obviously correct reference written here."""
from __future__ import annotations

import math
import random

import pytest
import torch

from vapo_megatron.values.boundaries import boundary_token_values, step_boundaries
from vapo_megatron.values.mc import (
    MCEstimate,
    explained_variance_ceiling,
    oracle_explained_variance,
    probe_rows,
    token_values,
)

NL = 10


def _boundaries_slow(ids, delimiters, every_tokens, every_step, max_steps):
    cands = [i + 1 for i, t in enumerate(ids) if t in delimiters] if delimiters else \
        [i for i in range(1, len(ids)) if i % every_tokens == 0]
    cands = [b for b in cands if b < len(ids)]
    kept = [0] + [b for j, b in enumerate(cands) if (j + 1) % every_step == 0]
    if len(kept) > max_steps:
        idx = sorted({round(i * (len(kept) - 1) / (max_steps - 1)) if max_steps > 1 else 0 for i in range(max_steps)})
        kept = [kept[i] for i in idx]
    return kept


def test_boundaries_match_a_slow_reference():
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.choice([NL, 1, 2, 3]) for _ in range(rng.randint(1, 40))]
        delimiters = {NL} if rng.random() < 0.7 else set()
        every_tokens = 0 if delimiters else rng.randint(1, 6)
        every_step, max_steps = rng.randint(1, 3), rng.randint(1, 8)
        got = step_boundaries(ids, delimiter_ids=delimiters, every_tokens=every_tokens, every_step=every_step,
                              max_steps=max_steps)
        assert got == _boundaries_slow(ids, delimiters, every_tokens, every_step, max_steps), (ids, every_step)
        assert got[0] == 0 and got == sorted(set(got)) and all(b < len(ids) for b in got) and len(got) <= max_steps


def test_boundaries_examples():
    ids = [1, 2, NL, 3, NL, 4, 5, NL]
    assert step_boundaries(ids, delimiter_ids={NL}) == [0, 3, 5]        # never after the last token
    assert step_boundaries(ids, delimiter_ids={NL}, every_step=2) == [0, 5]
    assert step_boundaries(ids, every_tokens=3) == [0, 3, 6]
    with pytest.raises(ValueError, match="delimiter ids or every_tokens"):
        step_boundaries(ids)


def test_token_values_are_the_step_values():
    value, nxt = boundary_token_values([0, 3, 5], [0.5, 0.25, 1.0], final=0.0, length=8, width=10)
    assert value.tolist() == [0.5] * 3 + [0.25] * 2 + [1.0] * 3 + [0.0] * 2
    assert nxt.tolist() == [0.25] * 3 + [1.0] * 2 + [0.0] * 3 + [0.0] * 2
    # VinePPO's step advantage V(next) - V(this) telescopes to R - V(0) over a response's steps
    est = MCEstimate([[0, 3, 5], [0]], [[0.5, 0.25, 1.0], [0.75]], tokens=0, requests=0, seconds=0.0)
    values, nexts = token_values(est, [8, 4], [0.0, 1.0], 10)
    step_adv = nexts - values
    firsts = [step_adv[0, b].item() for b in (0, 3, 5)]
    assert math.isclose(sum(firsts), 0.0 - 0.5)
    assert step_adv[1, :4].tolist() == [0.25] * 4 and step_adv[1, 4:].abs().sum() == 0


def test_probe_rows_spread_over_groups():
    assert probe_rows(16, 4, 4) == [0, 4, 8, 12]
    assert probe_rows(16, 4, 6) == [0, 1, 4, 5, 8, 12]
    assert probe_rows(4, 4, 8) == [0, 1, 2, 3]


def test_oracle_explained_variance_matches_numpy_formula():
    gen = torch.Generator().manual_seed(0)
    critic = torch.rand(3, 12, generator=gen)
    est = MCEstimate([[0, 4, 9], [0, 2]], [[0.5, 0.25, 1.0], [0.0, 0.75]], tokens=0, requests=0, seconds=0.0)
    rows = [0, 2]
    pred = [critic[0, 0], critic[0, 4], critic[0, 9], critic[2, 0], critic[2, 2]]
    target = [0.5, 0.25, 1.0, 0.0, 0.75]
    mean_t = sum(target) / 5
    resid = [t - float(p) for t, p in zip(target, pred)]
    mean_r = sum(resid) / 5
    ref = 1 - sum((r - mean_r) ** 2 for r in resid) / sum((t - mean_t) ** 2 for t in target)
    assert math.isclose(oracle_explained_variance(critic, rows, est), ref, rel_tol=1e-9)
    flat = MCEstimate([[0]], [[0.5]], 0, 0, 0.0)
    assert math.isnan(oracle_explained_variance(critic, [0], flat))


def _ceiling_slow(boundaries, values, finals, lengths):
    """1 - Var(G - V) / Var(G) over every token, V the value of the token's step start: loops, floats."""
    pairs = []
    for bounds, vals, g, n in zip(boundaries, values, finals, lengths):
        for t in range(n):
            j = max(i for i, b in enumerate(bounds) if b <= t)
            pairs.append((g, vals[j]))
    mean_g = sum(g for g, _ in pairs) / len(pairs)
    mean_r = sum(g - v for g, v in pairs) / len(pairs)
    var_g = sum((g - mean_g) ** 2 for g, _ in pairs) / len(pairs)
    var_r = sum((g - v - mean_r) ** 2 for g, v in pairs) / len(pairs)
    return 1 - var_r / var_g


def _fatal_walk(n, k, gen, q=0.15, a=0.8, steps=4, span=(2, 7)):
    """Responses of `steps` steps; each step is fatal with probability q (the value is 0 from the next boundary
    on), a surviving response scores 1 with probability a. The true value at boundary j of a live response is
    a (1 - q)^(steps - j). The Monte-Carlo estimate at each boundary: k Bernoulli draws of the true value."""
    bounds, exact, mc, var, finals, lengths = [], [], [], [], [], []
    for _ in range(n):
        alive, b, e, m, s, pos = True, [], [], [], [], 0
        for j in range(steps):
            v = a * (1 - q) ** (steps - j) if alive else 0.0
            draws = torch.bernoulli(torch.full((k,), v, dtype=torch.float64), generator=gen)
            b.append(pos), e.append(v), m.append(draws.mean().item()), s.append(draws.var().item())
            pos += int(torch.randint(span[0], span[1], (1,), generator=gen))
            alive = alive and torch.rand(1, generator=gen).item() >= q
        finals.append(float(alive and torch.rand(1, generator=gen).item() < a))
        bounds.append(b), exact.append(e), mc.append(m), var.append(s), lengths.append(pos)
    return bounds, exact, mc, var, finals, lengths


def test_ev_ceiling_of_exact_values_matches_slow_reference():
    gen = torch.Generator().manual_seed(1)
    bounds, exact, _, _, finals, lengths = _fatal_walk(60, 2, gen)
    est = MCEstimate(bounds, exact, 0, 0, 0.0, variances=[[0.0] * len(b) for b in bounds], k=2)
    got = explained_variance_ceiling(est, lengths, finals)
    assert math.isclose(got, _ceiling_slow(bounds, exact, finals, lengths), rel_tol=1e-6)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_ev_ceiling_corrects_the_monte_carlo_noise(k):
    """From noisy K-sample values the corrected ceiling lands on the exact values' ceiling; the uncorrected
    explained variance of the same noisy values reads low by about E[V(1 - V)] / (K Var G)."""
    gen = torch.Generator().manual_seed(k)
    bounds, exact, mc, var, finals, lengths = _fatal_walk(4000, k, gen)
    truth = _ceiling_slow(bounds, exact, finals, lengths)
    got = explained_variance_ceiling(MCEstimate(bounds, mc, 0, 0, 0.0, variances=var, k=k), lengths, finals)
    naive = _ceiling_slow(bounds, mc, finals, lengths)
    assert abs(got - truth) < 0.02, (got, truth)
    assert truth - naive > 0.3 / k, (naive, truth)  # the correction is needed, most of all at small K


def test_ev_ceiling_is_undefined_without_spread_or_repeats():
    est = MCEstimate([[0, 2]], [[0.5, 1.0]], 0, 0, 0.0, variances=[[0.25, 0.0]], k=1)
    assert math.isnan(explained_variance_ceiling(est, [4], [1.0]))                    # K = 1: no noise estimate
    est = MCEstimate([[0], [0]], [[1.0], [1.0]], 0, 0, 0.0, variances=[[0.0], [0.0]], k=4)
    assert math.isnan(explained_variance_ceiling(est, [3, 5], [1.0, 1.0]))            # every reward equal
