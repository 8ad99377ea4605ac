"""Step boundaries, step token values, the probe's rows and `ev_oracle` (values/), each against a slow, obviously
correct reference written here."""
from __future__ import annotations

import math
import random

import pytest
import torch

from vapo_megatron.values.boundaries import boundary_token_values, step_boundaries
from vapo_megatron.values.mc import MCEstimate, oracle_explained_variance, probe_rows, token_values

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
