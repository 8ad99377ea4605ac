"""The synthetic reward's first wrong step: the first response line that differs from the correct solution,
found from the (chat-templated) prompt, returned as ``first_error_span`` and carried by the reward manager."""
from __future__ import annotations

import random

from vapo_megatron.data.synthetic import (
    ChainProblem,
    SyntheticDifficulty,
    find_problem,
    first_wrong_step_span,
    format_solution,
    mistaken_values,
    sample_problem,
)
from vapo_megatron.models.tiny import build_char_tokenizer
from vapo_megatron.rewards import RewardItem, RewardManager, synthetic_reward

PROBLEM = ChainProblem(start=7, steps=(("+", 5), ("*", 2), ("-", 9)))  # b=12, c=24, d=15


def _templated(prompt: str) -> str:
    tok = build_char_tokenizer()
    return tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False)


def test_first_wrong_line_span():
    """Failure: the span is not the first line that differs from the correct solution."""
    slip = "b=7+5=12\nc=12*2=25\nd=25-9=16\n#### 16"
    assert slip[slice(*first_wrong_step_span(PROBLEM, slip))] == "c=12*2=25"
    copy = "b=7+5=12\nc=13*2=26\nd=26-9=17\n#### 17"
    assert copy[slice(*first_wrong_step_span(PROBLEM, copy))] == "c=13*2=26"
    answer = "b=7+5=12\nc=12*2=24\nd=24-9=15\n#### 16"
    assert answer[slice(*first_wrong_step_span(PROBLEM, answer))] == "#### 16"
    first = "b=7+5=13\n#### 13"
    assert first_wrong_step_span(PROBLEM, first) == (0, 8)
    assert first_wrong_step_span(PROBLEM, format_solution(PROBLEM)) is None
    assert first_wrong_step_span(PROBLEM, "b=7+5=12\nc=12*2=2") is None, "cut short is not a wrong step"
    assert first_wrong_step_span(PROBLEM, "b=7+5=12\n") is None
    blank = "b=7+5=12\n\nd=1"
    assert first_wrong_step_span(PROBLEM, blank) == (9, 10)


def test_span_matches_the_injected_mistake():
    """Failure: on demonstrations with one propagated slip, the span is not the slipped step's line."""
    rng = random.Random(0)
    for _ in range(200):
        problem = sample_problem(rng, SyntheticDifficulty(min_steps=1, max_steps=8))
        values = mistaken_values(problem, rng, 99)
        slipped = next(i for i, (v, c) in enumerate(zip(values, problem.values())) if v != c)
        response = format_solution(problem, values)
        start, end = first_wrong_step_span(problem, response)
        assert response[start:end] == response.split("\n")[slipped - 1]


def test_reward_returns_span_from_templated_prompt():
    """Failure: the reward does not find the chain in a chat-templated prompt, or returns a span for a correct
    response or without a prompt (plain numbers stay plain)."""
    prompt = _templated(PROBLEM.prompt)
    assert find_problem(prompt) == PROBLEM and find_problem("no chain here") is None
    slip = "b=7+5=12\nc=12*2=25\nd=25-9=16\n#### 16"
    assert synthetic_reward(slip, "15", prompt=prompt) == {"score": 0.0, "first_error_span": [9, 18]}
    assert synthetic_reward(format_solution(PROBLEM), "15", prompt=prompt) == 1.0
    assert synthetic_reward(slip, "15") == 0.0


def test_manager_carries_first_error_span():
    """Failure: the reward manager drops a reward's extras (first_error_span) or its score."""
    prompt = _templated(PROBLEM.prompt)
    items = [RewardItem(response="b=7+5=13\n#### 13", ground_truth="15", prompt=prompt),
             RewardItem(response=format_solution(PROBLEM), ground_truth="15", prompt=prompt)]
    with RewardManager("synthetic", reward_kwargs={"correct_score": 1.0, "incorrect_score": -1.0}) as manager:
        res = manager.score(items)
    assert res.scores == [-1.0, 1.0] and res.status == ["ok", "ok"]
    assert res.extras == [{"first_error_span": [0, 8]}, {}]
