"""The synthetic chain-arithmetic task: format, length growth, imperfect demonstrations, files."""
from __future__ import annotations

import json
import random
import statistics

import pytest

from vapo_megatron.data.synthetic import (
    ChainProblem,
    SyntheticDifficulty,
    extract_answer,
    format_solution,
    generate_demonstrations,
    generate_prompts,
    is_correct,
    parse_prompt,
    sample_problem,
    write_synthetic_task,
)
from vapo_megatron.rewards import synthetic_reward


def test_documented_example():
    """A failure pinpoints the exact prompt/response format documented in the module docstring."""
    problem = ChainProblem(start=7, steps=(("+", 5), ("*", 2), ("-", 9)))
    assert problem.prompt == "a=7; b=a+5; c=b*2; d=c-9; d=?"
    assert format_solution(problem) == "b=7+5=12\nc=12*2=24\nd=24-9=15\n#### 15"
    assert problem.answer == 15 and parse_prompt(problem.prompt) == problem


@pytest.mark.parametrize("difficulty", [SyntheticDifficulty(), SyntheticDifficulty(3, 12, 9, 99, ("+", "-", "*"))])
def test_problems_stay_in_range_and_round_trip(difficulty):
    """A failure pinpoints problem sampling: steps within [min_steps, max_steps], every value within
    [0, max_value], operands within range, and prompts that parse back to the same problem."""
    rng = random.Random(0)
    for _ in range(300):
        problem = sample_problem(rng, difficulty)
        assert difficulty.min_steps <= problem.num_steps <= difficulty.max_steps
        assert all(0 <= v <= difficulty.max_value for v in problem.values())
        assert all(1 <= x <= difficulty.max_operand and op in difficulty.operators for op, x in problem.steps)
        assert parse_prompt(problem.prompt) == problem


def test_response_length_grows_several_fold_with_steps():
    """A failure pinpoints the property length-adaptive GAE needs: responses of 8-step problems are several
    times longer than those of 1-step problems."""
    means = {}
    for k in (1, 8):
        rows = generate_demonstrations(200, seed=1, difficulty=SyntheticDifficulty(min_steps=k, max_steps=k))
        means[k] = statistics.mean(len(r["response"]) for r in rows)
    assert means[8] > 4 * means[1]


def test_correct_demonstrations_all_score_one():
    """A failure pinpoints the solution writer or the answer extraction: error-free demonstrations must all
    parse and score 1, and every step line must be right."""
    rows = generate_demonstrations(500, seed=2, error_rate=0.0)
    for row in rows:
        assert extract_answer(row["response"]) == int(row["ground_truth"])
        assert synthetic_reward(row["response"], row["ground_truth"]) == 1.0
        assert row["response"] == format_solution(parse_prompt(row["prompt"])) and not row["has_mistake"]


@pytest.mark.parametrize("error_rate", [0.3, 0.7, 1.0])
def test_demonstration_error_rate(error_rate):
    """A failure pinpoints mistake injection: about 1 - error_rate of the demonstrations are correct, every
    mistaken one has a wrong final answer, and its values stay in range (no negative numbers)."""
    rows = generate_demonstrations(2000, seed=3, error_rate=error_rate)
    correct = [is_correct(r["response"], r["ground_truth"]) for r in rows]
    assert abs(sum(correct) / len(rows) - (1 - error_rate)) < 0.04
    assert all(c != r["has_mistake"] for c, r in zip(correct, rows))
    for row in rows:
        values = [int(line.rsplit("=", 1)[1]) for line in row["response"].splitlines()[:-1]]
        assert all(0 <= v <= 99 for v in values) and extract_answer(row["response"]) == values[-1]


def test_answer_extraction_edge_cases():
    """A failure pinpoints answer extraction: the last '####' wins, malformed answers score 0."""
    assert extract_answer("#### 3\n#### 12") == 12
    assert extract_answer("b=1+2=3") is None
    assert extract_answer("####") is None
    assert extract_answer("#### " + "9" * 5000) is None
    assert synthetic_reward("#### 12", "12", correct_score=1.0, incorrect_score=-1.0) == 1.0
    assert synthetic_reward("#### 13", "12", correct_score=1.0, incorrect_score=-1.0) == -1.0
    assert not is_correct("#### 12", "twelve")


def test_generation_is_deterministic_and_val_is_held_out(tmp_path):
    """A failure pinpoints seeding or the held-out split: the same seed writes the same files, validation
    prompts are unique and never appear in training or in the demonstrations."""
    paths = write_synthetic_task(tmp_path / "a", num_train=300, num_val=50, num_demonstrations=100, seed=5)
    again = write_synthetic_task(tmp_path / "b", num_train=300, num_val=50, num_demonstrations=100, seed=5)
    for name in ("train", "val", "sft"):
        assert paths[name].read_text() == again[name].read_text()
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    val_prompts = {r["prompt"] for r in rows["val"]}
    assert len(val_prompts) == 50
    assert not val_prompts & {r["prompt"] for r in rows["train"] + rows["sft"]}
    assert generate_prompts(20, seed=6) != generate_prompts(20, seed=5)


def test_difficulty_validation():
    """A failure pinpoints the difficulty checks (messages quote the numbers)."""
    with pytest.raises(ValueError, match=r"min_steps \(5\) <= max_steps \(2\)"):
        SyntheticDifficulty(min_steps=5, max_steps=2)
    with pytest.raises(ValueError, match="must contain"):
        SyntheticDifficulty(operators=("+",))
    with pytest.raises(ValueError, match="could only draw"):
        generate_prompts(100, difficulty=SyntheticDifficulty(1, 1, 1, 2), unique=True)
