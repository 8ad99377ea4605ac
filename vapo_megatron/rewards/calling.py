"""How a reward function is called: its signature decides, so that users' own functions work unchanged.

Two signatures are recognised from the function's parameters:

* the project's: ``fn(response, ground_truth, *, prompt="", data_source="", extra=None, **reward_kwargs)``;
* verl's custom reward: ``compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs)``
  (recognised by a parameter named ``solution_str``), called with keywords: ``solution_str`` is the response,
  ``extra_info`` the row's ``extra_info`` (verl's meaning).

Either way, only the keyword arguments the function declares are passed (all of them when it takes
``**kwargs``): a function written without ``**kwargs`` and without ``correct_score`` still works.
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

VERL_MARKER = "solution_str"


@dataclass(frozen=True)
class RewardSignature:
    """What a reward function accepts."""

    style: str
    """``"vapo"`` (response and ground truth positionally) or ``"verl"`` (everything by keyword)."""
    keywords: frozenset[str] | None
    """Keyword names it accepts; None when it takes ``**kwargs`` (then every keyword is passed)."""

    def accepts(self, name: str) -> bool:
        return self.keywords is None or name in self.keywords


@functools.lru_cache(maxsize=64)
def reward_signature(fn: Callable[..., Any]) -> RewardSignature:
    """The :class:`RewardSignature` of ``fn`` (cached per function)."""
    params = inspect.signature(fn).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        keywords = None
    else:
        keywords = frozenset(p.name for p in params
                             if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY))
    style = "verl" if any(p.name == VERL_MARKER for p in params) else "vapo"
    return RewardSignature(style=style, keywords=keywords)


def call_arguments(fn: Callable[..., Any], response: str, ground_truth: str, prompt: str, data_source: str,
                   extra: dict | None, reward_kwargs: Mapping[str, Any]) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` to call ``fn`` with for one item, keeping only the keywords it accepts."""
    sig = reward_signature(fn)
    if sig.style == "verl":
        extra_info = (extra or {}).get("extra_info", extra)
        offered = {"data_source": data_source, "solution_str": response, "ground_truth": ground_truth,
                   "extra_info": extra_info, "prompt": prompt, **reward_kwargs}
        return (), {k: v for k, v in offered.items() if sig.accepts(k)}
    offered = {"prompt": prompt, "data_source": data_source, "extra": extra, **reward_kwargs}
    return (response, ground_truth), {k: v for k, v in offered.items() if sig.accepts(k)}


def call_reward(fn: Callable[..., Any], item: tuple, reward_kwargs: Mapping[str, Any]) -> Any:
    """``fn``'s raw output for ``item`` = ``(response, ground_truth, prompt, data_source, extra)``."""
    args, kwargs = call_arguments(fn, *item, reward_kwargs)
    return fn(*args, **kwargs)


def check_reward_signature(fn: Callable[..., Any], reward_kwargs: Mapping[str, Any] = {}) -> None:  # noqa: B006
    """Raise TypeError naming ``fn``'s signature when it cannot be called as a reward (e.g. it needs an argument
    neither signature provides). Nothing is called."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # a builtin without an inspectable signature: find out on the first call
    args, kwargs = call_arguments(fn, "response", "ground truth", "prompt", "source", None, reward_kwargs)
    try:
        sig.bind(*args, **kwargs)
    except TypeError as e:
        name = getattr(fn, "__qualname__", repr(fn))
        raise TypeError(f"reward function {name}{sig} cannot be called as a reward ({e}). Use the project's "
                        "signature fn(response, ground_truth, **kwargs) or verl's compute_score(data_source, "
                        "solution_str, ground_truth, extra_info=None)") from None


def describe(fn: Callable[..., Any]) -> str:
    """``module.name(signature)`` of a reward function, for messages."""
    try:
        sig = str(inspect.signature(fn))
    except (TypeError, ValueError):
        sig = "(...)"
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', repr(fn))}{sig}"
