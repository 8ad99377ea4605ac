"""Masked reductions, counts and explained variance against loops over the valid elements; layer purity."""

from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vapo_megatron.algorithms as algorithms
from vapo_megatron.algorithms import (
    count_correct_tokens,
    count_seqs,
    count_tokens,
    explained_variance,
    explained_variance_from_stats,
    explained_variance_stats,
    masked_max,
    masked_mean,
    masked_min,
    masked_sum,
)

FAST = settings(max_examples=30, deadline=None)


def batch(seed: int, rows: int, length: int):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (rows,), generator=gen)
    lengths[0] = length
    mask = torch.arange(length)[None, :] < lengths[:, None]
    x = torch.randn(rows, length, generator=gen, dtype=torch.float64)
    y = x + 0.5 * torch.randn(rows, length, generator=gen, dtype=torch.float64)
    return x, y, mask, lengths.tolist()


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), length=st.integers(0, 10))
def test_masked_reductions_match_loops(seed, rows, length):
    """Failure: a masked reduction includes padding, or the empty case is not the documented identity."""
    x, _, mask, lengths = batch(seed, rows, length)
    x = torch.where(mask, x, torch.nan)  # padding must never be read
    valid = [[float(x[b, t]) for t in range(n)] for b, n in enumerate(lengths)]
    flat = [v for row in valid for v in row]
    assert masked_sum(x, mask).item() == pytest.approx(sum(flat))
    assert masked_mean(x, mask).item() == pytest.approx(sum(flat) / max(len(flat), 1))
    assert masked_mean(x, mask, count=100).item() == pytest.approx(sum(flat) / 100)
    assert masked_max(x, mask).item() == (max(flat) if flat else -math.inf)
    assert masked_min(x, mask).item() == (min(flat) if flat else math.inf)
    row_sums = masked_sum(x, mask, dim=-1)
    assert row_sums.tolist() == pytest.approx([sum(r) for r in valid])
    assert masked_mean(x, mask, dim=-1).tolist() == pytest.approx([sum(r) / max(len(r), 1) for r in valid])
    assert masked_max(x, mask, dim=-1).tolist() == [max(r) if r else -math.inf for r in valid]


def test_counts():
    """Failure: global-normaliser counts include padding, empty rows or incorrect responses."""
    mask = torch.tensor([[1, 1, 0], [0, 0, 0], [1, 1, 1]])
    assert count_tokens(mask).item() == 5
    assert count_seqs(mask).item() == 2
    assert count_correct_tokens(mask, torch.tensor([False, True, True])).item() == 3


@FAST
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 5), length=st.integers(2, 10))
def test_explained_variance_matches_formula(seed, rows, length):
    """Failure: explained variance is not 1 - Var(G - V) / Var(G) over valid tokens (population variances)."""
    values, returns, mask, lengths = batch(seed, rows, length)
    g = [float(returns[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    r = [float(returns[b, t] - values[b, t]) for b, n in enumerate(lengths) for t in range(n)]

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    expected = 1 - var(r) / var(g)
    assert explained_variance(returns, values, mask).item() == pytest.approx(expected, rel=1e-9, abs=1e-9)
    stats = explained_variance_stats(returns, values, mask)
    assert stats.dtype == torch.float64 and stats.shape == (5,)
    assert stats.tolist() == pytest.approx([sum(g), sum(x * x for x in g), sum(r), sum(x * x for x in r), len(g)])


def test_explained_variance_undefined_cases_are_nan():
    """Failure: constant returns (e.g. every response wrong, lam = 1) or an empty batch give a number, not NaN."""
    mask = torch.ones(2, 4, dtype=torch.bool)
    returns = torch.full((2, 4), 0.3)
    assert math.isnan(explained_variance(returns, torch.randn(2, 4), mask).item())
    assert math.isnan(explained_variance_from_stats(torch.zeros(5)).item())
    perfect = torch.randn(2, 4)
    assert explained_variance(perfect, perfect, mask).item() == pytest.approx(1.0)


FORBIDDEN_PREFIXES = ("torch.distributed", "megatron", "vllm", "vapo_megatron.")


def test_algorithms_layer_imports_no_distributed_or_megatron():
    """Failure: the pure-math layer imports torch.distributed, Megatron, vLLM or a higher project layer."""
    package_dir = Path(algorithms.__file__).parent
    offenders = []
    for path in sorted(package_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                inside = name.startswith("vapo_megatron.algorithms")
                if name.startswith(FORBIDDEN_PREFIXES) and not inside:
                    offenders.append(f"{path.name}: {name}")
            if isinstance(node, ast.Attribute) and node.attr == "distributed":
                offenders.append(f"{path.name}: attribute .distributed")
    assert not offenders, offenders


def _reference_explained_variance(returns, values, lengths, float32_eps=2.0 ** -23):
    """Slow reference: 1 - Var(G - V) / Var(G) over valid tokens, undefined (NaN) when the returns are all equal
    up to the float32 rounding of `advantages + values` (|G_i - G_j| within a few eps of the values' scale)."""
    g = [float(returns[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    v = [float(values[b, t]) for b, n in enumerate(lengths) for t in range(n)]
    scale = max(abs(x) for x in g + v)
    if max(g) - min(g) <= 8 * float32_eps * scale:
        return math.nan

    def var(xs):
        mean = sum(xs) / len(xs)
        return sum((x - mean) ** 2 for x in xs) / len(xs)

    return 1 - var([a - b for a, b in zip(g, v)]) / var(g)


def test_explained_variance_of_equal_returns_from_gae_is_nan_not_minus_1e13():
    """Failure: every reward equal (all wrong) gives GAE returns equal up to float32 rounding of adv + values;
    explained variance then came out as about -1e13 instead of undefined (issue 13)."""
    from vapo_megatron.algorithms import decoupled_gae, token_rewards_from_scores

    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([16, 9, 16, 12])
    mask = torch.arange(16)[None, :] < lengths[:, None]
    values = (torch.randn(4, 16, generator=gen) * 0.3) * mask
    gae = decoupled_gae(token_rewards_from_scores(torch.zeros(4), mask), values, mask, gamma=1.0, lam_critic=1.0,
                        lam_policy=0.95)
    ev = explained_variance(gae.returns, values, mask).item()
    assert math.isnan(_reference_explained_variance(gae.returns, values, lengths.tolist()))
    assert math.isnan(ev), f"explained variance of equal returns logged as {ev}"
    varied = decoupled_gae(token_rewards_from_scores(torch.tensor([1.0, 0.0, 1.0, 0.0]), mask), values, mask,
                           gamma=1.0, lam_critic=1.0, lam_policy=0.95)
    assert explained_variance(varied.returns, values, mask).item() == pytest.approx(
        _reference_explained_variance(varied.returns, values, lengths.tolist()), rel=1e-6)
