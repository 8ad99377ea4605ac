"""ev_mc (explained variance against the Monte-Carlo return) and the first-wrong-step credit metric, against
slow loops over the valid tokens."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vapo_megatron.algorithms import explained_variance_mc, first_error_credit, monte_carlo_returns

FAST = settings(max_examples=30, deadline=None)


def _batch(seed: int, rows: int, length: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, length + 1, (rows,), generator=gen)
    mask = torch.arange(length)[None, :] < lengths[:, None]
    values = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    scores = torch.randint(0, 2, (rows,), generator=gen).double()
    scores[0], scores[-1] = 0.0, 1.0  # both outcomes present (rows >= 2)
    return values, scores, mask, lengths.tolist()


def _var(xs: list[float]) -> float:
    mean = sum(xs) / len(xs)
    return sum((x - mean) ** 2 for x in xs) / len(xs)


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(2, 6), length=st.integers(1, 9))
def test_ev_mc_matches_loop(seed, rows, length):
    """Failure: ev_mc is not 1 - Var(R - V) / Var(R) over valid tokens with R the row's final reward."""
    values, scores, mask, lengths = _batch(seed, rows, length)
    g = [float(scores[b]) for b, n in enumerate(lengths) for _ in range(n)]
    r = [float(scores[b] - values[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    assert explained_variance_mc(values, scores, mask).item() == pytest.approx(1 - _var(r) / _var(g), abs=1e-9)
    ret = monte_carlo_returns(scores, mask)
    assert ret[~mask].abs().sum() == 0 and all(ret[b, t] == scores[b] for b, n in enumerate(lengths)
                                                  for t in range(n))


def test_ev_mc_all_returns_equal_is_nan_not_huge():
    """Failure: a batch where every response scores the same gives a huge negative number instead of NaN."""
    mask = torch.ones(3, 5, dtype=torch.bool)
    for score in (0.0, 1.0, 0.3):
        ev = explained_variance_mc(torch.randn(3, 5), torch.full((3,), score), mask).item()
        assert math.isnan(ev), ev
    perfect = torch.tensor([0.0, 1.0, 1.0])
    assert explained_variance_mc(perfect[:, None].expand(3, 5), perfect, mask).item() == pytest.approx(1.0)


def _credit_loop(adv, mask, err):
    first, rest, gaps, rows = [], [], [], 0
    for b in range(adv.shape[0]):
        f = [float(adv[b, t]) for t in range(adv.shape[1]) if mask[b, t] and err[b, t]]
        o = [float(adv[b, t]) for t in range(adv.shape[1]) if mask[b, t] and not err[b, t]]
        if not f:
            continue
        rows += 1
        first += f
        rest += o
        if o:
            gaps.append(sum(f) / len(f) - sum(o) / len(o))
    return first, rest, gaps, rows


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 6), length=st.integers(1, 9))
def test_first_error_credit_matches_loop(seed, rows, length):
    """Failure: the pooled means, ratio, per-row gap or row count of the first-wrong-step metric are wrong."""
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(rows, length, generator=gen) < 0.8
    err = torch.rand(rows, length, generator=gen) < 0.3
    adv = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    got = {k: v.item() for k, v in first_error_credit(adv, mask, err).items()}
    first, rest, gaps, n = _credit_loop(adv, mask, err)
    nan_or = (lambda xs: sum(xs) / len(xs) if xs else math.nan)
    want = {"first": nan_or(first), "rest": nan_or(rest), "gap": nan_or(gaps), "rows": float(n)}
    want["ratio"] = want["first"] / want["rest"] if rest and want["rest"] < 0 else math.nan
    for k, v in want.items():
        assert (math.isnan(v) and math.isnan(got[k])) or got[k] == pytest.approx(v, abs=1e-9), (k, got, want)


def test_sequence_level_advantages_have_zero_gap():
    """Failure: GRPO/DAPO-style advantages (one value per response) show a first-wrong-step contrast."""
    adv = torch.tensor([[-1.0] * 6, [-0.5] * 6, [0.7] * 6])
    mask = torch.ones(3, 6, dtype=torch.bool)
    err = torch.zeros(3, 6, dtype=torch.bool)
    err[0, 2:4] = err[1, 0:1] = True
    got = first_error_credit(adv, mask, err)
    assert got["gap"].item() == 0.0 and got["rows"].item() == 2
    blamed = adv.clone()
    blamed[0, 2:4] = -3.0  # the critic pins the blame on the first wrong step
    got = first_error_credit(blamed, mask, err)
    assert got["gap"].item() < 0 and got["ratio"].item() > 1
