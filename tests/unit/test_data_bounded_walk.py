"""The bounded-walk task (vapo_megatron/data/bounded_walk.py): format round trip, the verifier against brute
force over every move sequence, the first-wrong-line span, demonstrations and the registered reward."""
import itertools
import json
import random

import pytest

from vapo_megatron.data import bounded_walk as bw
from vapo_megatron.rewards.registry import get_reward


def _response(problem: bw.WalkProblem, ops: str) -> str:
    total, lines = problem.start, []
    for i, (op, n) in enumerate(zip(ops, problem.numbers)):
        new = total + n if op == "+" else total - n
        lines.append(f"{bw.KEYS[i]}{n} {total}{op}{n}={new}")
        total = new
    return "\n".join(lines + [f"#### {total}"])


def test_prompt_round_trip_and_bad_prompts():
    problem = bw.WalkProblem(start=4, numbers=(3, 1, 5, 2))
    assert problem.prompt() == "0..9 from 4: a3 b1 c5 d2"
    assert bw.parse_prompt(problem.prompt()) == problem
    for bad in ("0..9 from 4:", "from 4: a3", "0..9 from 4: b3", "0..9 from 4: a3 c1"):
        with pytest.raises(ValueError):
            bw.parse_prompt(bad)


def test_verifier_equals_brute_force_over_all_move_sequences():
    """Every +/- sequence of small problems: right iff every running total stays in 0..9 (the rule, checked
    directly), and otherwise the first wrong line is the first step that leaves the range."""
    rng = random.Random(1)
    for _ in range(40):
        problem = bw.sample_problem(rng, 1, 6)
        for ops in itertools.product("+-", repeat=len(problem.numbers)):
            totals = list(itertools.accumulate(
                (n if op == "+" else -n for op, n in zip(ops, problem.numbers)), initial=problem.start))[1:]
            first_out = next((i for i, t in enumerate(totals) if not 0 <= t <= 9), None)
            response = _response(problem, "".join(ops))
            assert bw.first_error_line(response, problem) == first_out
            ok, span = bw.score(response, problem.prompt())
            assert ok == (first_out is None)
            if span is not None:
                assert response[span[0]:span[1]].rstrip("\n") == response.split("\n")[first_out]


def test_no_dead_ends_and_forced_steps():
    """Numbers are at most 5, so every total in 0..9 has a move that stays in range."""
    for total in range(10):
        for n in range(1, bw.MAX_NUMBER + 1):
            assert bw.valid_moves(total, n)
    assert bw.valid_moves(7, 3) == ["-"] and bw.valid_moves(4, 2) == ["+", "-"]


def test_broken_lines_and_answer():
    problem = bw.WalkProblem(start=4, numbers=(3, 1))
    good = "a3 4+3=7\nb1 7-1=6\n#### 6"
    assert bw.first_error_line(good, problem) is None
    assert bw.first_error_line("a3 4+3=8\nb1 8-1=7\n#### 7", problem) == 0     # arithmetic
    assert bw.first_error_line("a3 4+3=7\nb1 6-1=5\n#### 5", problem) == 1     # not the previous total
    assert bw.first_error_line("a3 4+3=7\nb2 7-2=5\n#### 5", problem) == 1     # wrong item copied
    assert bw.first_error_line("a3 4+3=7\nb1 7-2=5\n#### 5", problem) == 1     # wrong number used
    assert bw.first_error_line("a3 4+3=7\nc1 7-1=6\n#### 6", problem) == 1     # wrong key
    assert bw.first_error_line("a3 4+3=7\nb1 7-1=6\n#### 5", problem) == 2     # wrong final answer
    assert bw.first_error_line("a3 4+3=7\nb1 7-1=6", problem) == 2             # missing answer line
    assert bw.first_error_line("a3 4+3=7", problem) == 1                       # missing step
    assert bw.first_error_line(good + "\nmore", problem) == 3                   # text after the answer
    assert bw.score("a3 4+3=7", problem.prompt())[1] == (7, 8)                 # missing line: the last character


def test_demonstrations_slip_at_forced_steps_only(tmp_path):
    paths = bw.write_task(tmp_path, num_train=200, num_val=50, num_demonstrations=400, slip_rate=0.2, seed=3)
    val = {json.loads(line)["prompt"] for line in paths["val"].read_text().splitlines()}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    assert len(val) == 50 and not val & {r["prompt"] for r in train} and not val & {r["prompt"] for r in sft}
    assert all(r["ground_truth"] == r["prompt"] for r in train)
    wrong = 0
    for row in sft:
        problem = bw.parse_prompt(row["prompt"])
        line = bw.first_error_line(row["response"], problem)
        if line is not None:
            wrong += 1
            step = row["response"].split("\n")[line]
            prev = int(step.split(" ")[1][0])     # the first wrong line starts from an in-range total
            assert len(bw.valid_moves(prev, problem.numbers[line])) == 1      # the slip is at a forced step
    assert 0.3 < wrong / len(sft) < 0.95
    clean = bw.write_task(tmp_path / "clean", num_train=1, num_val=1, num_demonstrations=100, slip_rate=0.0)
    assert all(bw.score(json.loads(r)["response"], json.loads(r)["prompt"])[0]
               for r in clean["sft"].read_text().splitlines())


def test_registered_reward_returns_score_and_span():
    fn = get_reward("bounded_walk")
    assert fn("a3 4+3=7\n#### 7", "0..9 from 4: a3") == {"score": 1.0, "first_error_span": None}
    out = fn("a3 4+3=7\nb5 7+5=12\n#### 12", "0..9 from 4: a3 b5", incorrect_score=-1.0)
    assert out == {"score": -1.0, "first_error_span": [9, 19]}
