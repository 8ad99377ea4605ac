"""Reward registry, user-function loading, output normalisation and the math-verify reward."""
from __future__ import annotations

import sys
import textwrap

import pytest

from vapo_megatron.rewards import registry
from vapo_megatron.rewards.builtin import math_reward
from vapo_megatron.rewards.registry import (
    available_rewards,
    get_reward,
    load_custom_reward,
    register_reward,
    resolve_reward,
    score_from_output,
)


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


def test_builtins_registered_and_typo_lists_names():
    """A failure pinpoints the registration of the built-in rewards or the unknown-name message."""
    assert {"math", "synthetic"} <= set(available_rewards())
    assert get_reward("math") is math_reward
    with pytest.raises(KeyError, match=r"unknown reward 'mth'.*'math'.*'synthetic'.*Did you mean 'math'"):
        get_reward("mth")


def test_duplicate_name_raises(clean_registry):
    """A failure pinpoints the duplicate-name check of register_reward."""
    register_reward("test_dup")(lambda response, ground_truth, **kw: 1.0)
    with pytest.raises(ValueError, match="'test_dup' is already registered"):
        register_reward("test_dup")(lambda response, ground_truth, **kw: 0.0)


def test_custom_function_from_file(tmp_path):
    """A failure pinpoints loading 'path/to/file.py:function' and its errors (missing file, missing function,
    not callable, a file that fails to run)."""
    path = tmp_path / "my_reward.py"
    path.write_text(textwrap.dedent("""
        LIMIT = 3
        def short(response, ground_truth, **kwargs):
            return {"score": float(len(response) <= LIMIT), "length": len(response)}
    """))
    fn = load_custom_reward(f"{path}:short")
    assert score_from_output(fn("ab", "")) == (1.0, {"length": 2})
    assert resolve_reward(f"{path}:short") is fn
    with pytest.raises(FileNotFoundError, match="reward file not found: .*missing.py"):
        load_custom_reward(f"{tmp_path}/missing.py:short")
    with pytest.raises(AttributeError, match=r"has no function 'long'.*callables there: \['short'\]"):
        load_custom_reward(f"{path}:long")
    with pytest.raises(TypeError, match="'LIMIT' .* is a int, not a function"):
        load_custom_reward(f"{path}:LIMIT")
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module_xyz\n")
    with pytest.raises(ImportError, match="error while running reward file .*broken.py"):
        load_custom_reward(f"{broken}:f")
    with pytest.raises(ValueError, match="must look like"):
        load_custom_reward(":f")


def test_custom_function_from_module(tmp_path, monkeypatch):
    """A failure pinpoints loading 'package.module:function' and the message for a missing module."""
    package = tmp_path / "userpkg_rewards_test"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "scoring.py").write_text("def exact(response, ground_truth, **kw):\n"
                                        "    return response.strip() == ground_truth\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        fn = load_custom_reward("userpkg_rewards_test.scoring:exact")
        assert score_from_output(fn(" 4 ", "4")) == (1.0, {})
        with pytest.raises(ModuleNotFoundError, match="reward module 'userpkg_rewards_test.nope' not found"):
            load_custom_reward("userpkg_rewards_test.nope:exact")
        with pytest.raises(AttributeError, match="module 'userpkg_rewards_test.scoring' has no function 'f'"):
            load_custom_reward("userpkg_rewards_test.scoring:f")
    finally:
        for name in [m for m in sys.modules if m.startswith("userpkg_rewards_test")]:
            del sys.modules[name]


@pytest.mark.parametrize("output, expected", [(1, 1.0), (True, 1.0), (0.25, 0.25), ({"score": -1, "acc": 0},
                                                                                     -1.0)])
def test_score_from_output(output, expected):
    """A failure pinpoints the normalisation of a reward's return value to a float."""
    assert score_from_output(output)[0] == expected


@pytest.mark.parametrize("output, error", [(None, TypeError), ("1", TypeError), ({"acc": 1}, ValueError),
                                           (float("nan"), ValueError)])
def test_score_from_output_rejects(output, error):
    """A failure pinpoints which bad return values are refused (they are counted as errors by the manager)."""
    with pytest.raises(error):
        score_from_output(output)


@pytest.mark.parametrize("response, ground_truth, expected", [
    ("so the answer is \\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("The answer is \\boxed{0.5}.", "\\frac{1}{2}", 1.0),
    ("The answer is 0.5", "1/2", 1.0),
    ("We add them: 40 + 2 = 42.", "42", 1.0),
    ("\\boxed{1+x}", "x+1", 1.0),
    ("\\boxed{\\frac{\\sqrt 2}{2}}", "\\sqrt{2}/2", 1.0),
    ("so x = 41, \\boxed{41}", "42", 0.0),
    ("I do not know", "42", 0.0),
    ("", "42", 0.0),
])
def test_math_reward(response, ground_truth, expected):
    """A failure pinpoints the math-verify reward: boxed and plain final answers, equivalent forms
    (1/2 = 0.5 = \\frac12), and 0 for wrong or missing answers."""
    assert math_reward(response, ground_truth) == expected


def test_math_reward_values_are_configurable():
    """A failure pinpoints the correct/incorrect values of the binary math reward (e.g. the +-1 convention)."""
    assert math_reward("\\boxed{2}", "2", correct_score=1.0, incorrect_score=-1.0) == 1.0
    assert math_reward("\\boxed{3}", "2", correct_score=1.0, incorrect_score=-1.0) == -1.0
