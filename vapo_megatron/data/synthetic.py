"""The embedded synthetic reasoning task: chains of small-number arithmetic (the project's CPU demo).

A tiny character-level model (hidden 128, 4 layers) learns it on two CPU cores in minutes, yet it has what VAPO
is about: a step-by-step chain of thought whose length grows with the problem, and a binary verifier reward at
the very end (one wrong intermediate result propagates to a wrong final answer).

Format (exact; every character is one token of the char tokenizer)
------------------------------------------------------------------
Prompt (the user message content): the start value, then one assignment per step, then the question::

    a=7; b=a+5; c=b*2; d=c-9; d=?

Variables are the letters ``a, b, c, ...`` in order (so at most 25 steps); ``a`` is the start value, each next
variable applies one operator (``+``, ``-`` or ``*``) with a small operand to the previous variable; the question
names the last variable. Steps are separated by ``"; "``.

Response (what the assistant writes): one line per step, ``<var>=<previous value><op><operand>=<result>``, then
the final-answer line ``#### <answer>``::

    b=7+5=12
    c=12*2=24
    d=24-9=15
    #### 15

Ground truth: the final value as a decimal string (``"15"``).

Numbers stay small so that a character-level model can learn the arithmetic: every value (start and
intermediate) lies in ``[0, max_value]`` (default 99), operands in ``[1, max_operand]`` (default 9; a
multiplier is at least 2). Problems are built so that no step leaves the range (an operator that would is not
chosen), so no modulo and no negative numbers appear. Responses grow by about 10 characters per step: about 17
characters for one step, about 87 for eight (several-fold, which is what length-adaptive GAE needs).

Scoring: :func:`extract_answer` takes the integer after the LAST ``####`` in the response; the reward is
correct iff it equals the ground truth (see ``vapo_megatron.rewards`` for the registered ``synthetic`` reward).

Imperfect demonstrations (for the supervised warm start): correct step-by-step solutions, except that a fraction
``error_rate`` of them contains exactly one arithmetic mistake (off by 1, 2 or 10: the slips of carrying) at a
random step, which is then propagated correctly through the remaining steps, so the final answer is wrong.
Every operator is injective on integers, so a wrong intermediate value always gives a wrong final answer: the
fraction of correct demonstrations is exactly ``1 - error_rate`` in expectation. A model imitating them starts
near that accuracy; with ``error_rate`` well above 0.5 it starts well under 50%.

Difficulty (:class:`SyntheticDifficulty`): the number of steps is uniform in ``[min_steps, max_steps]``; raise
``max_steps``, ``max_value`` or add ``"*"`` to the operators to make the task harder (for ablations).
"""
from __future__ import annotations

import json
import random
import re
import string
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DATA_SOURCE = "synthetic_chain"
"""The ``data_source`` written into every generated row (the reward manager can route on it)."""

VARIABLES = string.ascii_lowercase
ANSWER_PREFIX = "####"
# Mistakes a learner makes in small-number arithmetic: off by one or two, or a dropped/extra carry (+-10).
MISTAKE_DELTAS = (-10, -2, -1, 1, 2, 10)
_ANSWER_RE = re.compile(r"####[ \t]*(-?\d+)")
_STEP_RE = re.compile(r"^([a-z])=([a-z])([+\-*])(\d+)$")
_START_RE = re.compile(r"^a=(\d+)$")
# A whole chain prompt inside a longer text (e.g. a chat template around the user message).
_PROMPT_IN_TEXT_RE = re.compile(r"a=\d+(?:; [a-z]=[a-z][+\-*]\d+)+; [a-z]=\?")


@dataclass(frozen=True)
class SyntheticDifficulty:
    """How hard the generated chains are; validated on construction."""

    min_steps: int = 1
    """Fewest operations in a problem (>= 1)."""
    max_steps: int = 8
    """Most operations in a problem (<= 25, the letters after ``a``)."""
    max_operand: int = 9
    """Largest operand of ``+``/``-`` and largest multiplier of ``*``."""
    max_value: int = 99
    """Every start and intermediate value lies in ``[0, max_value]``."""
    operators: tuple[str, ...] = ("+", "-")
    """Operators used; must contain ``+`` and ``-`` (so some step is always possible); ``*`` is optional."""

    def __post_init__(self) -> None:
        if not 1 <= self.min_steps <= self.max_steps <= len(VARIABLES) - 1:
            raise ValueError(f"need 1 <= min_steps ({self.min_steps}) <= max_steps ({self.max_steps}) "
                             f"<= {len(VARIABLES) - 1}")
        if self.max_operand < 1 or self.max_value < 2:
            raise ValueError(f"need max_operand >= 1 and max_value >= 2, got max_operand={self.max_operand}, "
                             f"max_value={self.max_value}")
        unknown = set(self.operators) - {"+", "-", "*"}
        if unknown or not {"+", "-"} <= set(self.operators):
            raise ValueError(f"operators must contain '+' and '-' and may add '*', got {self.operators!r}")
        if "*" in self.operators and self.max_operand < 2:
            raise ValueError(f"'*' needs max_operand >= 2 (multipliers are 2..max_operand), "
                             f"got {self.max_operand}")


@dataclass(frozen=True)
class ChainProblem:
    """One problem: a start value and a sequence of ``(operator, operand)`` steps."""

    start: int
    steps: tuple[tuple[str, int], ...] = field(default_factory=tuple)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    def values(self) -> list[int]:
        """The correct value of every variable, start included (``num_steps + 1`` numbers)."""
        values = [self.start]
        for op, operand in self.steps:
            values.append(apply_op(op, values[-1], operand))
        return values

    @property
    def answer(self) -> int:
        return self.values()[-1]

    @property
    def prompt(self) -> str:
        return format_prompt(self)


def apply_op(op: str, value: int, operand: int) -> int:
    """``value <op> operand`` for one of ``+``, ``-``, ``*``."""
    if op == "+":
        return value + operand
    if op == "-":
        return value - operand
    if op == "*":
        return value * operand
    raise ValueError(f"unknown operator {op!r}")


def _feasible_steps(value: int, difficulty: SyntheticDifficulty) -> dict[str, range]:
    """Operands of each operator that keep the result in ``[0, max_value]``."""
    d = difficulty
    options = {
        "+": range(1, min(d.max_operand, d.max_value - value) + 1),
        "-": range(1, min(d.max_operand, value) + 1),
    }
    if "*" in d.operators:
        options["*"] = range(2, min(d.max_operand, d.max_value // value if value else d.max_operand) + 1)
    return {op: operands for op, operands in options.items() if len(operands) > 0}


def sample_problem(rng: random.Random, difficulty: SyntheticDifficulty = SyntheticDifficulty()) -> ChainProblem:
    """Draw one problem: the number of steps uniformly, then at each step a feasible operator and operand."""
    num_steps = rng.randint(difficulty.min_steps, difficulty.max_steps)
    value = rng.randint(0, difficulty.max_value)
    start, steps = value, []
    for _ in range(num_steps):
        options = _feasible_steps(value, difficulty)
        op = rng.choice(sorted(options))
        operand = rng.choice(options[op])
        steps.append((op, operand))
        value = apply_op(op, value, operand)
    return ChainProblem(start=start, steps=tuple(steps))


def format_prompt(problem: ChainProblem) -> str:
    """``a=7; b=a+5; b=?`` (see the module docstring)."""
    parts = [f"a={problem.start}"]
    for i, (op, operand) in enumerate(problem.steps):
        parts.append(f"{VARIABLES[i + 1]}={VARIABLES[i]}{op}{operand}")
    parts.append(f"{VARIABLES[problem.num_steps]}=?")
    return "; ".join(parts)


def parse_prompt(prompt: str) -> ChainProblem:
    """Inverse of :func:`format_prompt`; raises ``ValueError`` naming the part that does not fit the format."""
    parts = prompt.strip().split("; ")
    start = _START_RE.match(parts[0]) if parts else None
    if start is None or len(parts) < 3:
        raise ValueError(f"not a synthetic chain prompt (want 'a=N; b=a+M; ...; x=?'): {prompt!r}")
    steps = []
    for i, part in enumerate(parts[1:-1]):
        m = _STEP_RE.match(part)
        if m is None or m.group(1) != VARIABLES[i + 1] or m.group(2) != VARIABLES[i]:
            raise ValueError(f"step {i + 1} {part!r} of {prompt!r} is not '{VARIABLES[i + 1]}={VARIABLES[i]}<op>N'")
        steps.append((m.group(3), int(m.group(4))))
    if parts[-1] != f"{VARIABLES[len(steps)]}=?":
        raise ValueError(f"the question of {prompt!r} should be '{VARIABLES[len(steps)]}=?', got {parts[-1]!r}")
    return ChainProblem(start=int(start.group(1)), steps=tuple(steps))


def find_problem(text: str) -> ChainProblem | None:
    """The chain problem whose prompt appears in ``text`` (e.g. a chat-templated prompt); None if none does."""
    match = _PROMPT_IN_TEXT_RE.search(text)
    if match is None:
        return None
    try:
        return parse_prompt(match.group(0))
    except ValueError:
        return None


def first_wrong_step_span(problem: ChainProblem, response: str) -> tuple[int, int] | None:
    """``[char_start, char_end)`` of the first line of ``response`` that differs from the correct solution
    (:func:`format_solution`): the first step line with a wrong result (or a wrong copied value, operator or
    variable), else a wrong final-answer line. None when every line present is right (e.g. a response cut short
    before its mistake, or a correct one)."""
    lines, expected, start = response.split("\n"), format_solution(problem).split("\n"), 0
    for i, (got, want) in enumerate(zip(lines, expected)):
        if got != want:
            if i == len(lines) - 1 and want.startswith(got):
                return None  # cut short, not wrong
            end = start + max(len(got), 1)  # an empty line: its newline
            return (start, end) if end <= len(response) else None
        start += len(got) + 1
    return None


def format_solution(problem: ChainProblem, values: Sequence[int] | None = None) -> str:
    """The step-by-step response; ``values`` (start included) default to the correct ones. Each line shows the
    previous value as written in the solution, so a mistake carries into the next line as it would by hand."""
    values = problem.values() if values is None else list(values)
    lines = []
    for i, (op, operand) in enumerate(problem.steps):
        lines.append(f"{VARIABLES[i + 1]}={values[i]}{op}{operand}={values[i + 1]}")
    lines.append(f"{ANSWER_PREFIX} {values[-1]}")
    return "\n".join(lines)


def extract_answer(response: str) -> int | None:
    """The integer after the last ``####`` in the response, or None when there is none."""
    matches = _ANSWER_RE.findall(response)
    if not matches or len(matches[-1]) > 20:
        # A run of digits this long is never a right answer, and int() refuses over 4,300 digits.
        return None
    return int(matches[-1])


def is_correct(response: str, ground_truth: str | int) -> bool:
    """Whether the response's final answer equals the ground truth (an integer, or its decimal string)."""
    answer = extract_answer(response)
    try:
        return answer is not None and answer == int(str(ground_truth).strip())
    except ValueError:
        return False


def mistaken_values(problem: ChainProblem, rng: random.Random, max_value: int) -> list[int]:
    """Variable values with one arithmetic mistake at a random step, propagated to the end and kept in
    ``[0, max_value]``. The final value always differs from the correct answer (every step is injective)."""
    correct = problem.values()
    candidates = [(step, delta) for step in range(1, len(correct)) for delta in MISTAKE_DELTAS]
    rng.shuffle(candidates)
    for step, delta in candidates:
        values = correct[:step] + [correct[step] + delta]
        for op, operand in problem.steps[step:]:
            values.append(apply_op(op, values[-1], operand))
        if all(0 <= v <= max_value for v in values):
            return values
    raise AssertionError("unreachable: a +-1 slip at the last step always stays in range")


def _problem_stream(seed: int | str, purpose: str, difficulty: SyntheticDifficulty,
                    exclude: set[str], unique: bool, count: int) -> list[ChainProblem]:
    # String seeds are hashed with SHA-512 by `random`, so streams are stable across runs and hash seeds.
    rng = random.Random(f"vapo-synthetic:{seed}:{purpose}")
    problems, seen = [], set(exclude)
    max_draws = 100 * count + 1000
    for _ in range(max_draws):
        if len(problems) == count:
            return problems
        problem = sample_problem(rng, difficulty)
        if problem.prompt in seen:
            continue
        if unique:
            seen.add(problem.prompt)
        problems.append(problem)
    if len(problems) == count:
        return problems
    raise ValueError(f"could only draw {len(problems)} of {count} {purpose} problems distinct from the "
                     f"{len(exclude)} excluded ones in {max_draws} draws; the difficulty {difficulty} leaves "
                     "too few distinct problems: lower the count or widen the difficulty")


def prompt_row(problem: ChainProblem) -> dict[str, Any]:
    """A dataset row in the plain form read by ``vapo_megatron.data.datasets``."""
    return {"prompt": problem.prompt, "ground_truth": str(problem.answer), "data_source": DATA_SOURCE,
            "num_steps": problem.num_steps}


def generate_prompts(count: int, seed: int | str = 0, difficulty: SyntheticDifficulty = SyntheticDifficulty(),
                     *, purpose: str = "train", exclude_prompts: Iterable[str] = (),
                     unique: bool = False) -> list[dict[str, Any]]:
    """``count`` prompt rows (``prompt``, ``ground_truth``, ``data_source``, ``num_steps``), deterministic in
    ``(seed, purpose)``, none of whose prompts is in ``exclude_prompts``; ``unique`` forbids repeats."""
    problems = _problem_stream(seed, purpose, difficulty, set(exclude_prompts), unique, count)
    return [prompt_row(p) for p in problems]


def generate_demonstrations(count: int, seed: int | str = 0,
                            difficulty: SyntheticDifficulty = SyntheticDifficulty(), *, error_rate: float = 0.0,
                            exclude_prompts: Iterable[str] = ()) -> list[dict[str, Any]]:
    """Supervised demonstrations: prompt rows plus ``response`` and ``has_mistake``. Each demonstration holds
    one propagated arithmetic mistake with probability ``error_rate`` (so about ``1 - error_rate`` of them
    reach the correct final answer)."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be in [0, 1], got {error_rate}")
    problems = _problem_stream(seed, "demonstrations", difficulty, set(exclude_prompts), False, count)
    rng = random.Random(f"vapo-synthetic:{seed}:mistakes")
    rows = []
    for problem in problems:
        has_mistake = rng.random() < error_rate
        values = mistaken_values(problem, rng, difficulty.max_value) if has_mistake else None
        rows.append({**prompt_row(problem), "response": format_solution(problem, values),
                     "has_mistake": has_mistake})
    return rows


def write_jsonl(rows: Iterable[dict[str, Any]], path: str | Path) -> Path:
    """Write rows as JSON lines (creating parent directories); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def write_synthetic_task(out_dir: str | Path, *, num_train: int = 4096, num_val: int = 256,
                         num_demonstrations: int = 4096, error_rate: float = 0.7, seed: int | str = 0,
                         difficulty: SyntheticDifficulty = SyntheticDifficulty()) -> dict[str, Path]:
    """Write ``train.jsonl`` (prompts), ``val.jsonl`` (held-out prompts: distinct from each other and from
    every training prompt) and ``sft.jsonl`` (imperfect demonstrations, never on a validation prompt) under
    ``out_dir``; returns their paths by name ``train``/``val``/``sft``."""
    out = Path(out_dir)
    train = generate_prompts(num_train, seed, difficulty, purpose="train")
    train_prompts = {row["prompt"] for row in train}
    val = generate_prompts(num_val, seed, difficulty, purpose="val", exclude_prompts=train_prompts, unique=True)
    sft = generate_demonstrations(num_demonstrations, seed, difficulty, error_rate=error_rate,
                                  exclude_prompts={row["prompt"] for row in val})
    return {"train": write_jsonl(train, out / "train.jsonl"), "val": write_jsonl(val, out / "val.jsonl"),
            "sft": write_jsonl(sft, out / "sft.jsonl")}
