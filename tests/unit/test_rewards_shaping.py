"""DAPO extras: soft overlong penalty and the equal-reward group filter."""
from __future__ import annotations

import pytest

from vapo_megatron.rewards.shaping import apply_overlong_penalty, filter_uniform_groups, overlong_penalty


@pytest.mark.parametrize("length, expected", [(0, 0.0), (16384, 0.0), (16385, -1 / 4096), (18432, -0.5),
                                              (20480, -1.0), (30000, -1.0)])
def test_overlong_penalty_dapo_values(length, expected):
    """A failure pinpoints DAPO's soft overlong punishment with its settings (max 20480, buffer 4096): zero up
    to 16384 tokens, linear to -1 at 20480, -1 beyond."""
    assert overlong_penalty(length, 20480, 4096) == pytest.approx(expected)


def test_overlong_penalty_factor_and_batch():
    """A failure pinpoints the penalty factor and the batched helper (penalty added to each score)."""
    assert overlong_penalty(15, 20, 10, penalty_factor=0.5) == pytest.approx(-0.25)
    assert apply_overlong_penalty([1.0, 1.0, 0.0], [5, 15, 20], 20, 10) == pytest.approx([1.0, 0.5, -1.0])
    with pytest.raises(ValueError, match="buffer=30, max_length=20"):
        overlong_penalty(1, 20, 30)


def test_filter_uniform_groups():
    """A failure pinpoints the group filter: groups whose rewards are all equal are dropped, order is kept."""
    rewards = [1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0 + 1e-9]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d"]
    assert filter_uniform_groups(rewards, groups) == [2, 3]
    assert filter_uniform_groups([], []) == []
