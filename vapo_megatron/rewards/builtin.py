"""Built-in verifier rewards: ``math`` (math-verify), ``synthetic`` (the embedded chain-arithmetic task) and
``bounded_walk`` (the credit-assignment miniature).

Both are binary: ``correct_score`` (default 1.0) when the final answer matches, ``incorrect_score`` (default 0.0)
otherwise, including when no answer can be extracted. The paper does not state its values; pass
``correct_score=1.0, incorrect_score=-1.0`` (as ``reward_kwargs`` of the reward manager) for the +-1 convention.
"""
from __future__ import annotations

import functools
import threading
from typing import Any

from vapo_megatron.data import bounded_walk, synthetic
from vapo_megatron.rewards.registry import register_reward


@functools.lru_cache(maxsize=4096)
def _parse_gold(ground_truth: str) -> Any:
    from math_verify import parse

    # A bare reference ("1/2", "\frac{1}{2}", "0.5") is wrapped in \boxed{} so that math-verify reads it as
    # LaTeX with top priority, the way a model's boxed answer is read.
    text = ground_truth if ("\\boxed" in ground_truth or "$" in ground_truth) else f"\\boxed{{{ground_truth}}}"
    return parse(text, parsing_timeout=_signal_timeout(5))


def _signal_timeout(seconds: int) -> int | None:
    # math-verify's own timeouts use SIGALRM, which only works in the main thread; elsewhere (a threaded
    # caller) they are disabled and the reward manager's worker-process timeout is the only guard.
    return seconds if threading.current_thread() is threading.main_thread() else None


@register_reward("math")
def math_reward(response: str, ground_truth: str, *, prompt: str = "", data_source: str = "",
                extra: dict | None = None, correct_score: float = 1.0, incorrect_score: float = 0.0,
                timeout_s: int = 5) -> float:
    """``correct_score`` if math-verify finds the response's final answer (``\\boxed{}`` first, then the last
    LaTeX or plain expression) equivalent to the ground truth (``1/2`` = ``0.5`` = ``\\frac12``), else
    ``incorrect_score``. ``timeout_s`` bounds math-verify's parsing and each comparison (main thread only).

    Not in-process safe: sympy simplification can take unbounded time on adversarial outputs.
    """
    from math_verify import parse, verify

    gold = _parse_gold(str(ground_truth))
    if not gold:
        raise ValueError(f"math-verify cannot parse the ground truth {ground_truth!r}")
    answer = parse(response, parsing_timeout=_signal_timeout(timeout_s))
    if not answer:
        return incorrect_score
    ok = verify(gold, answer, timeout_seconds=_signal_timeout(timeout_s))
    return correct_score if ok else incorrect_score


@register_reward("synthetic", in_process_safe=True)
def synthetic_reward(response: str, ground_truth: str, *, prompt: str = "", data_source: str = "",
                     extra: dict | None = None, correct_score: float = 1.0,
                     incorrect_score: float = 0.0) -> float | dict:
    """``correct_score`` iff the integer after the last ``####`` equals the ground truth (see
    :mod:`vapo_megatron.data.synthetic`), else ``incorrect_score``. A wrong response whose ``prompt`` holds the
    chain and which has a wrong line returns ``{"score": incorrect_score, "first_error_span": [start, end)}``,
    the characters of its first wrong line (:func:`~vapo_megatron.data.synthetic.first_wrong_step_span`).
    In-process safe: linear regex scans, a line-by-line comparison and integer arithmetic."""
    if synthetic.is_correct(response, ground_truth):
        return correct_score
    problem = synthetic.find_problem(prompt)
    span = None if problem is None else synthetic.first_wrong_step_span(problem, response)
    return incorrect_score if span is None else {"score": incorrect_score, "first_error_span": list(span)}


@register_reward("bounded_walk", in_process_safe=True)
def bounded_walk_reward(response: str, ground_truth: str, *, prompt: str = "", data_source: str = "",
                        extra: dict | None = None, correct_score: float = 1.0,
                        incorrect_score: float = 0.0) -> dict:
    """``correct_score`` iff the response is a valid walk of the problem ``ground_truth`` (see
    :mod:`vapo_megatron.data.bounded_walk`), else ``incorrect_score``; ``first_error_span`` is the character
    span of the first wrong line (None when right). In-process safe: one linear pass over the lines."""
    ok, span = bounded_walk.score(response, ground_truth)
    return {"score": correct_score if ok else incorrect_score,
            "first_error_span": None if span is None else list(span)}
