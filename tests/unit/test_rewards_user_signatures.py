"""Users' own rewards work unchanged (verl's signature, the documented one without **kwargs), non-numbers count
as failures with a clear message, and a systematic failure is reported with the function, the exception and the
first failing item. A failure pinpoints rewards/calling.py or the failure bookkeeping of rewards/manager.py."""
from __future__ import annotations

import textwrap

import pytest

from vapo_megatron.rewards import RewardItem, RewardManager, systematic_failure
from vapo_megatron.rewards.calling import check_reward_signature, reward_signature

USER_REWARDS = textwrap.dedent("""
    def compute_score(data_source, solution_str, ground_truth, extra_info=None):
        assert isinstance(extra_info, dict) and extra_info["split"] == "train", extra_info
        return float(solution_str.strip() == ground_truth) + (0.5 if data_source == "bonus" else 0.0)

    def documented(response, ground_truth, *, prompt="", data_source="", extra=None):
        return float(response == ground_truth)

    def two_args(response, ground_truth):
        return 1.0 if response == ground_truth else 0.0

    def returns_nan(response, ground_truth, **kwargs):
        return float("nan")

    def returns_string(response, ground_truth, **kwargs):
        return "1.0"

    def raises(response, ground_truth, **kwargs):
        raise RuntimeError("boom from the user's reward")

    def rare(response, ground_truth, **kwargs):
        if response == "bad":
            raise ValueError("one bad item")
        return 1.0

    def needs_more(response, ground_truth, tokenizer):
        return 0.0
""")
KWARGS = {"correct_score": 1.0, "incorrect_score": 0.0}


@pytest.fixture
def rewards_file(tmp_path):
    path = tmp_path / "user_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def _items(n=4, response="42"):
    return [RewardItem(response, "42", prompt="p", data_source="src", extra={"extra_info": {"split": "train"}})
            for _ in range(n)]


def test_verl_signature_scores_with_zero_errors_in_workers(rewards_file):
    """verl's compute_score(data_source, solution_str, ground_truth, extra_info=None) runs unchanged in a worker
    process: today's code calls it as fn(response, ground_truth, prompt=...) and every call fails."""
    items = _items(3) + [RewardItem("41", "42", data_source="bonus", extra={"extra_info": {"split": "train"}})]
    with RewardManager(f"{rewards_file}:compute_score", reward_kwargs=KWARGS, startup_timeout_s=120) as manager:
        res = manager.score(items)
    assert res.stats.num_errors == 0, res.stats.error_examples
    assert res.scores == [1.0, 1.0, 1.0, 0.5]


@pytest.mark.parametrize("name", ["documented", "two_args"])
def test_functions_without_kwargs_get_only_what_they_declare(rewards_file, name):
    """README's documented signature written without **kwargs must not get correct_score / incorrect_score."""
    res = RewardManager(f"{rewards_file}:{name}", reward_kwargs=KWARGS, in_process=True).score(_items())
    assert res.stats.num_errors == 0, res.stats.error_examples
    assert res.scores == [1.0] * 4


def test_signature_detection():
    sig = reward_signature(lambda data_source, solution_str, ground_truth, extra_info=None: 0.0)
    assert sig.style == "verl" and sig.keywords == {"data_source", "solution_str", "ground_truth", "extra_info"}
    assert reward_signature(lambda response, ground_truth, **kw: 0.0).keywords is None


def test_incompatible_signature_fails_at_construction(rewards_file):
    with pytest.raises(TypeError, match="tokenizer"):
        RewardManager(f"{rewards_file}:needs_more", in_process=True)
    with pytest.raises(TypeError, match="cannot be called as a reward"):
        check_reward_signature(lambda: 0.0)


@pytest.mark.parametrize("name, message", [("returns_nan", "non-finite score"),
                                           ("returns_string", "got str '1.0'")])
def test_non_numbers_are_failures_with_a_clear_message(rewards_file, name, message):
    res = RewardManager(f"{rewards_file}:{name}", in_process=True).score(_items())
    assert res.stats.num_errors == 4 and res.scores == [0.0] * 4
    fatal = systematic_failure(res.stats, 0.5)
    assert fatal is not None and message in fatal and name in fatal


def test_systematic_failure_names_function_exception_item_and_traceback(rewards_file, capfd):
    """Every call raising -> a message with the function, the exception text, the first item and the traceback;
    the traceback is printed to stderr once per kind, not once per call or per batch."""
    manager = RewardManager(f"{rewards_file}:raises", in_process=True)
    for _ in range(2):
        res = manager.score(_items(5))
    fatal = systematic_failure(res.stats, 1.0)
    assert fatal is not None
    for part in ("5 of 5", "raises", "RuntimeError: boom from the user's reward", "'ground_truth': '42'",
                 "Traceback (most recent call last)"):
        assert part in fatal, part
    assert capfd.readouterr().err.count("reward failure (error)") == 1


def test_rare_failures_are_only_counted(rewards_file):
    items = _items(9) + [RewardItem("bad", "42")]
    res = RewardManager(f"{rewards_file}:rare", in_process=True).score(items)
    assert res.stats.num_errors == 1
    assert systematic_failure(res.stats, 0.5) is None
    assert systematic_failure(res.stats, 0.05) is not None  # 10% > 5%: the configured fraction is honoured


def test_verl_default_routes_by_data_source():
    """verl datasets score without user code: gsm8k by '####', MATH / DAPO / AIME by math-verify; an unknown
    source is a counted failure naming the known ones."""
    items = [RewardItem("so the answer is #### 1,234", "1234", data_source="openai/gsm8k"),
             RewardItem("#### 7", "8", data_source="openai/gsm8k"),
             RewardItem("The answer is $\\boxed{\\frac{1}{2}}$", "0.5", data_source="lighteval/MATH"),
             RewardItem("Answer: 34", "34", data_source="math_dapo"),
             RewardItem("\\boxed{17}", "17", data_source="aime2024"),
             RewardItem("\\boxed{17}", "17", data_source="my_private_source")]
    res = RewardManager("verl_default", reward_kwargs=KWARGS, in_process=True).score(items)
    assert res.scores == [1.0, 0.0, 1.0, 1.0, 1.0, 0.0]
    assert res.status[-1] == "error" and "openai/gsm8k" in res.stats.error_examples[0]
