"""The bounded-walk task: long step-by-step responses, a sparse verifier reward, and decisive local mistakes
that are visible in the text (the miniature of the credit-assignment study).

The paper's setting (docs/VAPO.md) has three properties that value-free methods handle badly: long responses,
a binary reward only at the end, and single local mistakes that decide the outcome. The arithmetic-chain task
(:mod:`vapo_megatron.data.synthetic`) has the last two, but a slip there ("c=12*2=25") can only be seen by
redoing the arithmetic, which a critic of a few hundred thousand parameters does not learn (explained variance
~0). Here a mistake leaves the text visibly broken (a total below 0 or above 9), so a small critic can learn that
the response is lost the moment it happens, and credit can be assigned token by token.

Format (every character is one token of the char tokenizer)
------------------------------------------------------------
Prompt: the start total, the key of the last step (steps are keyed ``a, b, c, ...``), and a table that gives,
for each total 0..9, the number to move by::

    0..9 from 4 to d: 0:3 1:1 2:5 3:2 4:3 5:1 6:3 7:5 8:2 9:4

Rule: at each step look up the number of the current total, then add it or subtract it; the running total must
stay within ``0..9``. Response: one line per step, ``<key> <total>:<number> <total><op><number>=<new total>``,
then ``#### <final total>``::

    a 4:3 4+3=7
    b 7:5 7-5=2
    c 2:5 2+5=7
    d 7:5 7-5=2
    #### 2

The lookup is an exact copy of the prompt's ``<total>:<number>`` pair (what a small transformer's induction
heads learn), keyed by content rather than by position, so the model's mistakes are about the walk, not about
finding the number. Numbers are 1..5, so from every total in 0..9 at least one move stays in range: there are no
dead ends and no lookahead. A step is *forced* when only one move stays in range (7 and 5: ``7+5=12`` leaves the
range) and *free* when both do (either is right).

Reward (binary, at the end): ``correct_score`` iff every step line is present, keyed in order, copies the table
entry of the previous total, is arithmetically right and stays in range, and the final line repeats the last
total. Any valid walk is right (there is no single reference answer); ``ground_truth`` is the problem itself.
:func:`first_error_span` gives the character span of the first line that breaks the rule (the decisive
mistake), which the trainer turns into the first-wrong-step credit metric.

Imperfect demonstrations (for the warm start): valid walks, except that at each forced step the move that
leaves the range is taken with probability ``slip_rate``; after a slip the walk goes on (the table entry of the
total's last digit; back into range where possible), so the response is long and wrong. A model imitating them
slips at forced steps at about that rate, so its accuracy falls with the number of steps.
"""
from __future__ import annotations

import json
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DATA_SOURCE = "bounded_walk"
KEYS = string.ascii_lowercase + string.ascii_uppercase
LOW, HIGH, MAX_NUMBER = 0, 9, 5
ANSWER_PREFIX = "####"
_PROMPT_RE = re.compile(r"^0\.\.9 from (\d) to ([a-zA-Z]): ((?:\d:\d ?){10})$")
_LINE_RE = re.compile(r"^([a-zA-Z]) (-?\d+):(\d) (-?\d+)([+-])(\d+)=(-?\d+)$")
_FIRST_PROMPT_RE = re.compile(r"^00\.\.09 from (\d\d) by (\d) to ([a-zA-Z])$")
_FIRST_LINE_RE = re.compile(r"^([a-zA-Z]) (-?\d+):(\d) (-?\d+)=(-?\d+)([+-])(\d+)$")
LAYOUTS = ("table", "total_first")


def _two(total: int) -> str:
    """A total in the total-first layout: two characters for -9..99 (``07``, ``12``, ``-3``), so that the first
    character already says whether a new total is in range (``0``) or not (``1`` or ``-``)."""
    return f"{total:02d}" if total >= 0 else str(total)


@dataclass(frozen=True)
class WalkProblem:
    start: int
    steps: int
    table: tuple[int, ...]
    """The number to move by from each total 0..9."""
    layout: str = "table"
    """``table``: the prompt lists the table, a line is ``a 4:3 4+3=7``. ``total_first`` (constant tables only):
    the prompt states the number once, and a line writes the new total before the arithmetic, with two-character
    totals, ``a 04:3 07=04+3``: the first character of the new total is the move's decisive token."""

    def prompt(self) -> str:
        if self.layout == "total_first":
            return f"00..09 from {_two(self.start)} by {self.table[0]} to {KEYS[self.steps - 1]}"
        entries = " ".join(f"{total}:{n}" for total, n in enumerate(self.table))
        return f"0..9 from {self.start} to {KEYS[self.steps - 1]}: {entries}"

    def line(self, key: str, total: int, number: int, op: str, new: int) -> str:
        if self.layout == "total_first":
            return f"{key} {_two(total)}:{number} {_two(new)}={_two(total)}{op}{number}"
        return f"{key} {total}:{number} {total}{op}{number}={new}"

    def answer(self, total: int) -> str:
        return f"{ANSWER_PREFIX} {_two(total) if self.layout == 'total_first' else total}"

    def number(self, total: int) -> int:
        """The table entry of ``total`` (of its last digit once a walk has left 0..9)."""
        return self.table[abs(total) % 10]


def parse_prompt(prompt: str) -> WalkProblem:
    """Inverse of :meth:`WalkProblem.prompt`; ``ValueError`` quoting the prompt when it does not fit."""
    m = _FIRST_PROMPT_RE.match(prompt.strip())
    if m is not None:
        return WalkProblem(start=int(m.group(1)), steps=KEYS.index(m.group(3)) + 1, table=(int(m.group(2)),) * 10,
                           layout="total_first")
    m = _PROMPT_RE.match(prompt.strip())
    if m is None:
        raise ValueError(f"not a bounded-walk prompt (want '0..9 from S to K: 0:n 1:n ... 9:n'): {prompt!r}")
    entries = [e.split(":") for e in m.group(3).split()]
    if [int(total) for total, _ in entries] != list(range(10)):
        raise ValueError(f"the table of {prompt!r} must list the totals 0..9 in order")
    return WalkProblem(start=int(m.group(1)), steps=KEYS.index(m.group(2)) + 1,
                       table=tuple(int(n) for _, n in entries))


def valid_moves(total: int, number: int) -> list[str]:
    """The moves (``+``/``-``) that keep ``total`` within 0..9."""
    return [op for op, new in (("+", total + number), ("-", total - number)) if LOW <= new <= HIGH]


TABLES = ("random", "constant")


def sample_problem(rng: random.Random, min_steps: int, max_steps: int, table: str = "random",
                   layout: str = "table") -> WalkProblem:
    """A problem with a ``random`` table (a number 1..5 drawn for each total) or a ``constant`` one (one number
    1..5 for every total: the lookup cannot go wrong, so every mistake is a move that leaves the range), in one
    of the ``LAYOUTS`` (``total_first`` needs a constant table)."""
    _check_table_and_layout(table, layout)
    start, steps = rng.randint(LOW, HIGH), rng.randint(min_steps, max_steps)
    if table == "random":
        return WalkProblem(start=start, steps=steps, table=tuple(rng.randint(1, MAX_NUMBER) for _ in range(10)))
    return WalkProblem(start=start, steps=steps, table=(rng.randint(1, MAX_NUMBER),) * 10, layout=layout)


def _check_table_and_layout(table: str, layout: str) -> None:
    if table not in TABLES:
        raise ValueError(f"table must be one of {TABLES}, got {table!r}")
    if layout not in LAYOUTS or (layout == "total_first" and table != "constant"):
        raise ValueError(f"layout must be one of {LAYOUTS} (total_first with table='constant'), got {layout!r} "
                         f"with table {table!r}")


def walk(problem: WalkProblem, rng: random.Random, slip_rate: float = 0.0) -> str:
    """A response: a random valid move at each step, except that at a forced step the out-of-range move is
    taken with probability ``slip_rate``; out of range, the walk takes a move back into range when there is one."""
    total, lines = problem.start, []
    for i in range(problem.steps):
        number = problem.number(total)
        valid = valid_moves(total, number)
        if len(valid) == 1 and LOW <= total <= HIGH and rng.random() < slip_rate:
            op = "-" if valid[0] == "+" else "+"
        else:
            op = rng.choice(valid) if valid else rng.choice("+-")
        new = total + number if op == "+" else total - number
        lines.append(problem.line(KEYS[i], total, number, op, new))
        total = new
    lines.append(problem.answer(total))
    return "\n".join(lines)


def _parse_line(line: str, layout: str) -> tuple[str, int, int, int, str, int, int] | None:
    """``(key, looked-up total, entry, previous total, op, number, new total)`` of a step line, or None. In the
    total-first layout every total must be written in its two-character form."""
    if layout == "total_first":
        m = _FIRST_LINE_RE.match(line)
        if m is None or any(_two(int(t)) != t for t in (m.group(2), m.group(4), m.group(5))):
            return None
        return (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(5)), m.group(6), int(m.group(7)),
                int(m.group(4)))
    m = _LINE_RE.match(line)
    if m is None:
        return None
    return (m.group(1), int(m.group(2)), int(m.group(3)), int(m.group(4)), m.group(5), int(m.group(6)),
            int(m.group(7)))


def first_error_line(response: str, problem: WalkProblem) -> int | None:
    """Index of the first response line that breaks the rule (a missing line counts at its index, text after
    the answer line at the line after it), or None when the response is right."""
    lines = response.strip("\n").split("\n")
    total = problem.start
    for i in range(problem.steps):
        parsed = _parse_line(lines[i], problem.layout) if i < len(lines) else None
        if parsed is None:
            return i
        key, looked_up, entry, prev, op, num, new = parsed
        want = prev + num if op == "+" else prev - num
        if (key != KEYS[i] or looked_up != total or entry != problem.number(total) or prev != total
                or num != entry or new != want or not LOW <= new <= HIGH):
            return i
        total = new
    k = problem.steps
    if k >= len(lines) or lines[k] != problem.answer(total):
        return k
    return None if len(lines) == k + 1 else k + 1


def first_error_span(response: str, problem: WalkProblem) -> tuple[int, int] | None:
    """``[start, end)`` character offsets of the first wrong line in ``response`` (the last character when that
    line is missing), or None when the response is right."""
    line = first_error_line(response, problem)
    if line is None:
        return None
    start = 0
    for i, text in enumerate(response.split("\n")):
        if i == line:
            return start, start + len(text) + 1
        start += len(text) + 1
    return max(0, len(response) - 1), len(response)   # a missing line: the end of the response


def score(response: str, ground_truth: str) -> tuple[bool, tuple[int, int] | None]:
    """``(correct, first_error_span)`` of a response to the problem ``ground_truth`` (its prompt)."""
    span = first_error_span(response, parse_prompt(ground_truth))
    return span is None, span


def _rows(count: int, rng: random.Random, min_steps: int, max_steps: int, exclude: set[str],
          slip_rate: float | None, table: str, layout: str) -> list[dict[str, Any]]:
    rows, seen = [], set(exclude)
    while len(rows) < count:
        problem = sample_problem(rng, min_steps, max_steps, table, layout)
        prompt = problem.prompt()
        if prompt in seen:
            continue
        if slip_rate is None:
            seen.add(prompt)
            rows.append({"prompt": prompt, "ground_truth": prompt, "data_source": DATA_SOURCE,
                         "extra_info": {"steps": problem.steps}})
        else:
            rows.append({"prompt": prompt, "response": walk(problem, rng, slip_rate)})
    return rows


def write_task(out_dir: str | Path, *, num_train: int = 4096, num_val: int = 128, num_demonstrations: int = 8192,
               min_steps: int = 6, max_steps: int = 20, slip_rate: float = 0.1, seed: int = 0,
               table: str = "random", layout: str = "table") -> dict[str, Path]:
    """``train.jsonl`` and ``val.jsonl`` (distinct prompts, none shared) and ``sft.jsonl`` (imperfect
    demonstrations, never on a validation prompt) under ``out_dir``; ``table`` and ``layout`` as in
    :func:`sample_problem`."""
    if not 1 <= min_steps <= max_steps <= len(KEYS):
        raise ValueError(f"need 1 <= min_steps ({min_steps}) <= max_steps ({max_steps}) <= {len(KEYS)}")
    _check_table_and_layout(table, layout)
    if table == "constant" and num_train + num_val > 5 * 10 * (max_steps - min_steps + 1):
        raise ValueError(f"a constant table allows only {5 * 10 * (max_steps - min_steps + 1)} distinct prompts "
                         f"for {min_steps}-{max_steps} steps; asked for {num_train} train + {num_val} val")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"bounded_walk/{seed}")
    val = _rows(num_val, rng, min_steps, max_steps, set(), None, table, layout)
    val_prompts = {r["prompt"] for r in val}
    train = _rows(num_train, rng, min_steps, max_steps, val_prompts, None, table, layout)
    sft = _rows(num_demonstrations, rng, min_steps, max_steps, val_prompts, slip_rate, table, layout)
    paths = {}
    for name, rows in (("train", train), ("val", val), ("sft", sft)):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
