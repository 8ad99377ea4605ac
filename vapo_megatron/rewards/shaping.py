"""DAPO's reward extras: the soft overlong punishment and the filter that drops groups with equal rewards.

Both are optional in VAPO (the paper's Table 1 recipe does not list them; DAPO, its baseline, uses both, and
VAPO's settings of prompt/response length are usually taken from DAPO).
"""
from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Sequence


def overlong_penalty(response_length: int, max_length: int, buffer: int, penalty_factor: float = 1.0) -> float:
    """DAPO's soft overlong punishment, added to the task reward.

    0 up to ``max_length - buffer`` tokens, then falling linearly to ``-penalty_factor`` at ``max_length``
    tokens (and ``-penalty_factor`` beyond):
    ``-penalty_factor * (response_length - (max_length - buffer)) / buffer`` in between. DAPO uses
    ``max_length = 20480``, ``buffer = 4096``.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"need 0 < buffer <= max_length, got buffer={buffer}, max_length={max_length}")
    excess = response_length - (max_length - buffer)
    if excess <= 0:
        return 0.0
    return -penalty_factor * min(excess / buffer, 1.0)


def apply_overlong_penalty(scores: Sequence[float], response_lengths: Sequence[int], max_length: int, buffer: int,
                           penalty_factor: float = 1.0) -> list[float]:
    """``scores`` plus :func:`overlong_penalty` of each response length."""
    if len(scores) != len(response_lengths):
        raise ValueError(f"{len(scores)} scores but {len(response_lengths)} response lengths")
    return [s + overlong_penalty(n, max_length, buffer, penalty_factor) for s, n in zip(scores, response_lengths)]


def filter_uniform_groups(rewards: Sequence[float], group_ids: Sequence[Hashable], *,
                          atol: float = 1e-6) -> list[int]:
    """Indices (in order) of the items whose group's rewards are not all equal within ``atol``.

    A group where every sample scores the same (all right or all wrong) has zero group-relative advantage and
    gives a value-free method no gradient; DAPO's dynamic sampling drops such groups and samples more prompts.
    (With VAPO's critic the advantages of such a group are not zero, so this filter is an option, not a must.)
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    lo: dict[Hashable, float] = defaultdict(lambda: float("inf"))
    hi: dict[Hashable, float] = defaultdict(lambda: float("-inf"))
    for r, g in zip(rewards, group_ids):
        lo[g], hi[g] = min(lo[g], r), max(hi[g], r)
    return [i for i, g in enumerate(group_ids) if hi[g] - lo[g] > atol]
