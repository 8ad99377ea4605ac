"""The bounded-walk task (vapo_megatron/data/bounded_walk.py): format round trip, the verifier against brute
force over every move sequence, the first-wrong-line span, demonstrations and the registered reward."""
import itertools
import json
import random

import pytest

from vapo_megatron.data import bounded_walk as bw
from vapo_megatron.rewards.registry import get_reward

TABLE = (3, 1, 5, 2, 3, 1, 3, 5, 2, 4)


def _response(problem: bw.WalkProblem, ops: str) -> str:
    total, lines = problem.start, []
    for i, op in enumerate(ops):
        n = problem.number(total)
        new = total + n if op == "+" else total - n
        lines.append(f"{bw.KEYS[i]} {total}:{n} {total}{op}{n}={new}")
        total = new
    return "\n".join(lines + [f"#### {total}"])


def test_prompt_round_trip_and_bad_prompts():
    problem = bw.WalkProblem(start=4, steps=4, table=TABLE)
    assert problem.prompt() == "0..9 from 4 to d: 0:3 1:1 2:5 3:2 4:3 5:1 6:3 7:5 8:2 9:4"
    assert bw.parse_prompt(problem.prompt()) == problem
    for bad in ("0..9 from 4 to d:", "0..9 from 4: 0:3 1:1 2:5 3:2 4:3 5:1 6:3 7:5 8:2 9:4",
                "0..9 from 4 to d: 1:3 0:1 2:5 3:2 4:3 5:1 6:3 7:5 8:2 9:4"):
        with pytest.raises(ValueError):
            bw.parse_prompt(bad)


def test_verifier_equals_brute_force_over_all_move_sequences():
    """Every +/- sequence of small problems: right iff every running total stays in 0..9 (the rule, checked
    directly on the totals), and otherwise the first wrong line is the first step that leaves the range."""
    rng = random.Random(1)
    for _ in range(40):
        problem = bw.sample_problem(rng, 1, 6)
        for ops in itertools.product("+-", repeat=problem.steps):
            totals, total = [], problem.start
            for op in ops:
                n = problem.table[abs(total) % 10]
                total = total + n if op == "+" else total - n
                totals.append(total)
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
    problem = bw.WalkProblem(start=4, steps=2, table=TABLE)        # 4 -> table 3; 7 -> table 5
    good = "a 4:3 4+3=7\nb 7:5 7-5=2\n#### 2"
    assert bw.first_error_line(good, problem) is None
    assert bw.first_error_line("a 4:3 4+3=8\nb 8:2 8-2=6\n#### 6", problem) == 0     # arithmetic
    assert bw.first_error_line("a 4:2 4+2=6\nb 6:3 6-3=3\n#### 3", problem) == 0     # wrong table entry
    assert bw.first_error_line("a 4:3 4+3=7\nb 6:3 6-3=3\n#### 3", problem) == 1     # not the previous total
    assert bw.first_error_line("a 4:3 4+3=7\nb 7:5 7-4=3\n#### 3", problem) == 1     # number not the entry
    assert bw.first_error_line("a 4:3 4+3=7\nc 7:5 7-5=2\n#### 2", problem) == 1     # wrong key
    assert bw.first_error_line("a 4:3 4+3=7\nb 7:5 7+5=12\n#### 12", problem) == 1   # leaves the range
    assert bw.first_error_line("a 4:3 4+3=7\nb 7:5 7-5=2\n#### 5", problem) == 2     # wrong final answer
    assert bw.first_error_line("a 4:3 4+3=7\nb 7:5 7-5=2", problem) == 2             # missing answer line
    assert bw.first_error_line("a 4:3 4+3=7", problem) == 1                          # missing step
    assert bw.first_error_line(good + "\nmore", problem) == 3                          # text after the answer
    assert bw.score("a 4:3 4+3=7", problem.prompt())[1] == (10, 11)                  # missing line: last char


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
            prev = int(row["response"].split("\n")[line].split(" ")[1].split(":")[0])
            assert len(bw.valid_moves(prev, problem.number(prev))) == 1      # the slip is at a forced step
    assert 0.3 < wrong / len(sft) < 0.95
    clean = bw.write_task(tmp_path / "clean", num_train=1, num_val=1, num_demonstrations=100, slip_rate=0.0)
    assert all(bw.score(json.loads(r)["response"], json.loads(r)["prompt"])[0]
               for r in clean["sft"].read_text().splitlines())


def test_registered_reward_returns_score_and_span():
    fn = get_reward("bounded_walk")
    prompt = bw.WalkProblem(start=4, steps=2, table=TABLE).prompt()
    assert fn("a 4:3 4+3=7\nb 7:5 7-5=2\n#### 2", prompt) == {"score": 1.0, "first_error_span": None}
    out = fn("a 4:3 4+3=7\nb 7:5 7+5=12\n#### 12", prompt, incorrect_score=-1.0)
    assert out == {"score": -1.0, "first_error_span": [12, 25]}


def test_constant_tables_and_their_prompt_budget(tmp_path):
    """table="constant": one number for every total, so the only way to go wrong in a step line is a move out
    of range; there are 5 x 10 x (max - min + 1) such prompts, and asking for more is refused up front."""
    paths = bw.write_task(tmp_path, num_train=100, num_val=20, num_demonstrations=200, slip_rate=0.2, seed=1,
                          min_steps=6, max_steps=8, table="constant")
    rows = [json.loads(line) for name in ("train", "val", "sft") for line in paths[name].read_text().splitlines()]
    assert all(len(set(bw.parse_prompt(r["prompt"]).table)) == 1 for r in rows)
    for row in rows[120:]:
        problem = bw.parse_prompt(row["prompt"])
        line = bw.first_error_line(row["response"], problem)
        if line is not None:  # a slip: the written total is out of range
            assert not 0 <= int(row["response"].split("\n")[line].split("=")[1]) <= 9
    with pytest.raises(ValueError, match="150 distinct prompts"):
        bw.write_task(tmp_path / "big", num_train=140, num_val=20, min_steps=6, max_steps=8, table="constant")
    with pytest.raises(ValueError, match="table must be one of"):
        bw.sample_problem(random.Random(0), 1, 2, table="diagonal")


def _total_first_response(problem: bw.WalkProblem, ops: str) -> str:
    """The total-first layout written out by hand: two-character totals, the new total before the arithmetic."""
    def two(t: int) -> str:
        return str(t) if t < 0 else str(t).rjust(2, "0")

    total, n, lines = problem.start, problem.table[0], []
    for i, op in enumerate(ops):
        new = total + n if op == "+" else total - n
        lines.append(f"{bw.KEYS[i]} {two(total)}:{n} {two(new)}={two(total)}{op}{n}")
        total = new
    return "\n".join(lines + [f"#### {two(total)}"])


def test_total_first_layout_verifier_and_decisive_character():
    """layout="total_first": the prompt round-trips, the verifier equals brute force over every move sequence,
    and the first character of each new total says whether the move left the range ('0' in range, '1' or '-'
    out), so the decisive token is the symptom. Disguised mistakes (a wrong in-range total, a one-character
    total) are wrong lines too."""
    problem = bw.WalkProblem(start=4, steps=3, table=(3,) * 10, layout="total_first")
    assert problem.prompt() == "00..09 from 04 by 3 to c"
    assert bw.parse_prompt(problem.prompt()) == problem
    rng = random.Random(2)
    for _ in range(30):
        problem = bw.sample_problem(rng, 1, 6, table="constant", layout="total_first")
        for ops in itertools.product("+-", repeat=problem.steps):
            response = _total_first_response(problem, "".join(ops))
            totals = [int(line.split(" ")[2].split("=")[0]) for line in response.split("\n")[:-1]]
            first_out = next((i for i, t in enumerate(totals) if not 0 <= t <= 9), None)
            assert bw.first_error_line(response, problem) == first_out
            for line, t in zip(response.split("\n"), totals):
                assert (line.split(" ")[2][0] == "0") == (0 <= t <= 9)
    p = bw.WalkProblem(start=7, steps=1, table=(3,) * 10, layout="total_first")
    assert bw.score("a 07:3 04=07-3\n#### 04", p.prompt()) == (True, None)
    assert bw.first_error_line("a 07:3 10=07+3\n#### 10", p) == 0     # out of range
    assert bw.first_error_line("a 07:3 08=07+3\n#### 08", p) == 0     # a wrong total that looks valid
    assert bw.first_error_line("a 07:3 4=07-3\n#### 04", p) == 0      # a total not in its two-character form
    assert bw.first_error_line("a 07:3 04=07-3\n#### 4", p) == 1      # the answer too
    with pytest.raises(ValueError, match="layout"):
        bw.sample_problem(rng, 1, 2, table="random", layout="total_first")
