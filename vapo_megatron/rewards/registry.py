"""The reward-function registry, user functions given as ``file.py:function`` / ``module:function``, and the
normalisation of what a reward function returns.

A reward function has the project's signature (or verl's ``compute_score(data_source, solution_str, ground_truth,
extra_info=None)``; see :mod:`vapo_megatron.rewards.calling`, which passes only the keywords a function accepts)::

    fn(response: str, ground_truth: str, *, prompt: str = "", data_source: str = "",
       extra: dict | None = None, **reward_kwargs) -> float | dict

``response`` is the decoded generated text (no prompt), ``ground_truth`` the dataset's reference answer,
``prompt`` the prompt text, ``data_source`` the row's source and ``extra`` any per-item data (e.g. the dataset
metadata). It returns the score as a number, or a dict with a ``"score"`` entry plus any other (picklable)
values, which are reported alongside. One such value has a meaning to the trainer: ``"first_error_span":
[char_start, char_end)``, 0-based character offsets into ``response`` of the response's first wrong step (see
:func:`first_error_span`); the trainer logs how much advantage those tokens get (``credit_first_error_*``).

``reward_kwargs`` are the fixed keyword arguments a :class:`~vapo_megatron.rewards.manager.RewardManager` was
given (e.g. ``correct_score``); a function gets only those it declares (all of them when it takes ``**kwargs``).
"""
from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, Union

RewardFn = Callable[..., Union[float, dict]]
RewardSpec = Union[str, RewardFn]
"""A registered name (``"math"``), ``"path/to/file.py:function"``, ``"package.module:function"`` or a callable."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True)
class RegisteredReward:
    """A registry entry."""

    name: str
    fn: RewardFn
    in_process_safe: bool
    """True only for functions that cannot hang (bounded work, no external solver), so that the reward manager
    may call them in the trainer's process without a timeout."""


_REGISTRY: dict[str, RegisteredReward] = {}
_FILE_MODULES: dict[Path, Any] = {}


def register_reward(name: str, *, in_process_safe: bool = False) -> Callable[[F], F]:
    """Decorator registering a reward function under ``name``; a name can be registered only once."""

    def decorator(fn: F) -> F:
        if name in _REGISTRY:
            old = _REGISTRY[name].fn
            raise ValueError(f"reward {name!r} is already registered (by {old.__module__}.{old.__qualname__}); "
                             "choose another name")
        if not callable(fn):
            raise TypeError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        _REGISTRY[name] = RegisteredReward(name=name, fn=fn, in_process_safe=in_process_safe)
        return fn

    return decorator


def available_rewards() -> list[str]:
    """The registered names, sorted."""
    return sorted(_REGISTRY)


def get_registered(name: str) -> RegisteredReward:
    """The registry entry of ``name``; an unknown name raises ``KeyError`` listing the valid ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"unknown reward {name!r}; registered rewards: {available_rewards()}, or give "
                       f"'path/to/file.py:function' / 'package.module:function'.{hint}") from None


def get_reward(name: str) -> RewardFn:
    """The function registered under ``name``."""
    return get_registered(name).fn


def is_custom_spec(spec: RewardSpec) -> bool:
    """Whether ``spec`` names a user function (``target:function``) rather than a registered reward."""
    return isinstance(spec, str) and ":" in spec


def resolve_reward(spec: RewardSpec) -> RewardFn:
    """A callable for a registered name, a ``target:function`` string or a callable (returned as is)."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"a reward must be a name, a 'target:function' string or a callable, got {spec!r}")
    return load_custom_reward(spec) if is_custom_spec(spec) else get_reward(spec)


def load_custom_reward(spec: str) -> RewardFn:
    """Load ``path/to/file.py:function`` (any target ending in ``.py`` or holding a path separator is a file)
    or ``package.module:function``; errors name the spec and what is missing."""
    target, _, fn_name = spec.rpartition(":")
    if not target or not fn_name:
        raise ValueError(f"custom reward {spec!r} must look like 'path/to/file.py:function' or "
                         "'package.module:function'")
    is_file = target.endswith(".py") or "/" in target or "\\" in target
    module = _load_file_module(Path(target), spec) if is_file else _import_module(target, spec)
    fn = getattr(module, fn_name, None)
    where = f"reward file {target}" if is_file else f"module {target!r}"
    if fn is None:
        defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise AttributeError(f"{where} has no function {fn_name!r} (from {spec!r}); callables there: {defined}")
    if not callable(fn):
        raise TypeError(f"{fn_name!r} in {where} is a {type(fn).__name__}, not a function (from {spec!r})")
    return fn


def _load_file_module(path: Path, spec: str) -> Any:
    path = path.expanduser().resolve()
    if not path.is_file():
        raise FileNotFoundError(f"reward file not found: {path} (from {spec!r})")
    if path in _FILE_MODULES:
        return _FILE_MODULES[path]
    # A unique module name per file, registered in sys.modules so that dataclasses and pickling of objects
    # defined in the file resolve their module while it loads.
    name = "_vapo_reward_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ImportError(f"cannot load {path} as Python (from {spec!r})")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[name]
        raise ImportError(f"error while running reward file {path} (from {spec!r}): {type(e).__name__}: {e}") from e
    _FILE_MODULES[path] = module
    return module


def _import_module(target: str, spec: str) -> Any:
    try:
        return importlib.import_module(target)
    except ModuleNotFoundError as e:
        # Only rephrase when the module itself is missing, not a module it imports.
        if e.name is not None and (target == e.name or target.startswith(e.name + ".")):
            raise ModuleNotFoundError(f"reward module {target!r} not found (from {spec!r}); is it installed or "
                                      "on PYTHONPATH? For a file give 'path/to/file.py:function'",
                                      name=e.name) from None
        raise


def score_from_output(output: Any) -> tuple[float, dict[str, Any]]:
    """``(score, extras)`` from a reward function's return value: a real number (bools count as 0/1) or a
    dict holding ``"score"``; non-finite scores and other types raise."""
    extras: dict[str, Any] = {}
    value = output
    if isinstance(output, dict):
        if "score" not in output:
            raise ValueError(f"a reward returning a dict must include 'score'; got keys {sorted(output)}")
        value = output["score"]
        extras = {k: v for k, v in output.items() if k != "score"}
    if isinstance(value, (str, bytes)) or not hasattr(value, "__float__"):
        raise TypeError(f"a reward must return a number or a dict with 'score', got {type(value).__name__} "
                        f"{value!r:.80}" + (" (return float(...), not a string)" if isinstance(value, str) else ""))
    score = float(value)
    if not math.isfinite(score):
        raise ValueError(f"a reward returned a non-finite score ({score})")
    return score, extras


FIRST_ERROR_SPAN = "first_error_span"
"""The extras key of a reward's ``[char_start, char_end)`` span of the response's first wrong step."""


def first_error_span(extras: dict[str, Any], text_length: int) -> tuple[int, int] | None:
    """The valid first-wrong-step span of a reward's extras: two integers ``0 <= start < end <= text_length``;
    None when absent or malformed (a bad span is ignored rather than failing the run: it only feeds a metric)."""
    span = extras.get(FIRST_ERROR_SPAN)
    if not isinstance(span, (list, tuple)) or len(span) != 2:
        return None
    start, end = span
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (start, end)):
        return None
    return (start, end) if 0 <= start < end <= text_length else None
