"""``verl_default``: rewards routed by ``data_source`` the way verl's ``default_compute_score`` routes them, so that a
verl math dataset scores without user code.

=========================================================================  =============================
``data_source``                                                            scored by
=========================================================================  =============================
``openai/gsm8k``, ``gsm8k``                                                the number after the last
                                                                           ``####`` (verl's gsm8k rule),
                                                                           else math-verify
``lighteval/MATH``, ``DigitalLearningGmbH/MATH-lighteval``,                math-verify (``math`` reward)
``HuggingFaceH4/MATH-500``, ``MATH``, ``math``, ``math_dapo``,
``math_dapo_reasoning``, ``BytedTsinghua-SIA/DAPO-Math-17k``, ``aime*``,
``numina_*``
=========================================================================  =============================

Departures from verl: every source scores ``correct_score`` / ``incorrect_score`` (verl's ``math_dapo`` gives
+1 / -1 from its own ``Answer:`` parser; math-verify reads ``\\boxed{}``, ``Answer:`` lines and plain final
answers alike). An unknown source raises ``NotImplementedError`` as verl's does (counted as a reward failure,
and refused before the run starts by the pre-flight check of the training data).
"""
from __future__ import annotations

import re

from vapo_megatron.rewards.builtin import math_reward
from vapo_megatron.rewards.registry import register_reward

GSM8K_SOURCES = frozenset({"openai/gsm8k", "gsm8k"})
MATH_SOURCES = frozenset({"lighteval/MATH", "DigitalLearningGmbH/MATH-lighteval", "HuggingFaceH4/MATH-500", "MATH",
                          "math", "math_dapo", "math_dapo_reasoning", "BytedTsinghua-SIA/DAPO-Math-17k"})
MATH_PREFIXES = ("aime", "numina_")
_GSM8K_ANSWER = re.compile(r"####\s*\$?\s*(-?[0-9][0-9,]*(?:\.[0-9]+)?)")


def is_known_source(data_source: str) -> bool:
    """Whether ``verl_default`` has a rule for ``data_source``."""
    return (data_source in GSM8K_SOURCES or data_source in MATH_SOURCES
            or data_source.lower().startswith(MATH_PREFIXES))


def known_sources() -> list[str]:
    return sorted(GSM8K_SOURCES | MATH_SOURCES) + [f"{p}*" for p in MATH_PREFIXES]


def _gsm8k_number(text: str) -> float | None:
    found = _GSM8K_ANSWER.findall(text)
    return float(found[-1].replace(",", "")) if found else None


@register_reward("verl_default")
def verl_default_reward(response: str, ground_truth: str, *, data_source: str = "", correct_score: float = 1.0,
                        incorrect_score: float = 0.0, **kwargs) -> float:
    """The score of ``response`` by the rule of its ``data_source`` (module docstring); NotImplementedError for
    a source without a rule."""
    if data_source in GSM8K_SOURCES:
        answer, gold = _gsm8k_number(response), _gsm8k_number(f"#### {ground_truth}")
        if answer is not None and gold is not None:
            return correct_score if abs(answer - gold) < 1e-9 else incorrect_score
    elif not is_known_source(data_source):
        raise NotImplementedError(f"verl_default has no reward for data_source={data_source!r}; known: "
                                  f"{', '.join(known_sources())}. Give reward.name='path/to/file.py:function'")
    return math_reward(response, ground_truth, correct_score=correct_score, incorrect_score=incorrect_score)
