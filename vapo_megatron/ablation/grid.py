"""Ablation grids: variants as dotted overrides on top of a base config, expanded into one run per (variant, seed),
with the check that makes the comparison fair (every run generates the same samples per PPO step, runs the same
number of PPO steps and is evaluated the same way; value pretraining is extra, as in the paper)."""
from __future__ import annotations

import ast
import dataclasses
import functools
import operator
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vapo_megatron.config import VapoConfig, load_config


class GridError(ValueError):
    """A grid file that cannot be read, or a variant that cannot be expanded."""


class BudgetError(ValueError):
    """Variants that would not be compared on equal terms (samples per step, PPO steps, evaluation)."""


@dataclass(frozen=True)
class Variant:
    name: str
    """Name of the variant, also its directory under the output folder."""
    overrides: tuple[str, ...]
    """Dotted overrides on top of the base config; values may hold ``${expr}`` placeholders."""
    paper: float | None = None
    """The paper's Table 1 score of this variant (AIME24 avg@32), for the report."""
    group: str = "ablation"
    """"method" (VAPO, PPO, DAPO) or "ablation" (VAPO without one component): the report's two panels."""
    note: str = ""
    """Where the variant departs from the paper's, for the report."""


@dataclass(frozen=True)
class Grid:
    base: str
    """Base config file (VAPO), the variants' starting point."""
    variants: tuple[Variant, ...]
    """The variants, in the grid file's order."""
    common: tuple[str, ...] = ()
    """Overrides of the grid file's ``set`` for every variant, applied before the variant's own."""
    task: str = ""
    """The grid file's ``task``: what model and task the variants are compared on, for the report."""


@dataclass(frozen=True)
class RunSpec:
    variant: Variant
    seed: int
    run_dir: Path
    common: tuple[str, ...]
    """Overrides of every variant: the grid's ``set`` and the command line's ``--set``."""
    resolved: tuple[str, ...]
    """The variant's overrides, placeholders resolved."""
    cfg: VapoConfig
    """The config the trainer will run."""

    @property
    def overrides(self) -> tuple[str, ...]:
        """Everything after ``--config base`` on the trainer's command line."""
        return (*self.common, *self.resolved, f"train.seed={self.seed}", f"checkpoint.run_dir={self.run_dir}",
                "checkpoint.export_hf_at_end=false", "logging.progress_bar=false")


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise GridError(f"cannot read grid file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise GridError(f"grid file {path}: the top level must be a mapping, got {data!r}")
    return data


def _parse_variants(raw: Any, path: Path) -> list[Variant]:
    if not isinstance(raw, dict) or not raw:
        raise GridError(f"grid file {path}: 'variants' must be a non-empty mapping name -> {{overrides, paper}}")
    out = []
    for name, spec in raw.items():
        spec = spec or {}
        unknown = set(spec) - {"overrides", "paper", "group", "note"}
        if unknown or not isinstance(spec.get("overrides", []), list):
            raise GridError(f"grid file {path}: variant {name!r} needs 'overrides' (a list) and optional 'paper', "
                            f"'group', 'note'; got keys {sorted(spec)}")
        out.append(Variant(str(name), tuple(str(o) for o in spec.get("overrides", [])), spec.get("paper"),
                           spec.get("group", "ablation"), spec.get("note", "")))
    return out


def load_grid(path: str | Path, base: str | None = None, only: Sequence[str] | None = None) -> Grid:
    """The grid of ``path``. ``include: other.yaml`` takes that file's base, set and variants first (this file's
    keys win, its ``set`` is appended); ``only`` (from the file, or the argument, which wins) keeps some variants
    in that order; ``base`` replaces the file's base config."""
    path = Path(path)
    data = _read_yaml(path)
    parent: dict = {}
    if "include" in data:
        parent = _read_yaml(path.parent / data["include"])
    variants = _parse_variants(data.get("variants", parent.get("variants")), path)
    only = only or data.get("only")
    if only:
        by_name = {v.name: v for v in variants}
        missing = [n for n in only if n not in by_name]
        if missing:
            raise GridError(f"unknown variant(s) {missing} in {path}; its variants: {', '.join(by_name)}")
        variants = [by_name[n] for n in only]
    base = base or data.get("base") or parent.get("base")
    if not base:
        raise GridError(f"grid file {path} names no base config ('base: file.yaml'); give --base")
    common = [*(parent.get("set") or []), *(data.get("set") or [])]
    task = str(data.get("task", parent.get("task", "")) or "").strip()
    return Grid(str(base), tuple(variants), tuple(str(c) for c in common), task)


_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    raise ValueError(f"unsupported expression {ast.unparse(node)!r}")


def eval_placeholder(expr: str, cfg: VapoConfig) -> int | float:
    """``expr`` (numbers, dotted config fields, + - * //) evaluated against ``cfg``; GridError otherwise."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        key = _dotted(node)
        try:
            return functools.reduce(getattr, key.split("."), cfg)
        except AttributeError:
            raise ValueError(f"{key!r} is not a config field") from None

    try:
        return ev(ast.parse(expr.strip(), mode="eval").body)
    except (SyntaxError, ValueError) as exc:
        raise GridError(f"placeholder ${{{expr}}}: {exc}") from exc


def resolve_overrides(overrides: Sequence[str], base_cfg: VapoConfig) -> list[str]:
    """``overrides`` with every ``${expr}`` replaced by its value under ``base_cfg``."""
    return [re.sub(r"\$\{([^}]*)\}", lambda m: str(eval_placeholder(m.group(1), base_cfg)), o) for o in overrides]


def plan_runs(grid: Grid, seeds: Sequence[int], out: str | Path, extra: Sequence[str] = ()) -> list[RunSpec]:
    """One RunSpec per (variant, seed): base + grid ``set`` + ``extra`` + the variant's overrides + seed and run
    directory. Raises GridError (a variant's config is invalid, every problem listed) or BudgetError."""
    from vapo_megatron.config import ConfigError

    common = (*grid.common, *extra)
    try:
        base_cfg = load_config(grid.base, common)
    except (ConfigError, OSError) as exc:
        raise GridError(f"base config {grid.base} with {list(common)}: {exc}") from exc
    specs = []
    resolved_by_name = {v.name: tuple(resolve_overrides(v.overrides, base_cfg)) for v in grid.variants}
    for seed in seeds:  # seed-major: a grid stopped early still covers every variant at the first seeds
        for variant in grid.variants:
            resolved = resolved_by_name[variant.name]
            spec = RunSpec(variant, seed, Path(out) / variant.name / f"seed{seed}", common, resolved, base_cfg)
            try:
                specs.append(dataclasses.replace(spec, cfg=load_config(grid.base, spec.overrides)))
            except ConfigError as exc:
                raise GridError(f"variant {variant.name!r}: {exc}") from exc
    check_budgets(specs)
    return specs


def budget(cfg: VapoConfig) -> dict[str, Any]:
    """What must be equal across a fair comparison."""
    return {"samples per PPO step (rollout.num_prompts x rollout.n)": cfg.rollout.num_prompts * cfg.rollout.n,
            "PPO steps (train.steps)": cfg.train.steps, "eval.every": cfg.eval.every, "eval.n": cfg.eval.n,
            "eval.max_prompts": cfg.eval.max_prompts, "data.val_files": cfg.data.val_files}


def check_budgets(specs: Sequence[RunSpec]) -> None:
    """BudgetError naming every variant whose budget differs from the first variant's, and how."""
    if not specs:
        return
    ref = specs[0]
    want = budget(ref.cfg)
    problems = []
    for spec in specs[1:]:
        got = budget(spec.cfg)
        problems += [f"{spec.variant.name} (seed {spec.seed}): {k} = {got[k]}, but {ref.variant.name} has {want[k]}"
                     for k in want if got[k] != want[k]]
    if problems:
        raise BudgetError("variants would not be compared on the same budget:\n" + "\n".join(
            f"  - {p}" for p in dict.fromkeys(problems)))


def validate_runs(specs: Sequence[RunSpec]) -> None:
    """Each run's config validated as the trainer will (one process); GridError listing the problems."""
    from vapo_megatron.config import ConfigError, validate
    from vapo_megatron.models.hf_config import load_arch

    problems = []
    for spec in specs:
        arch = load_arch(spec.cfg.model.hf_dir) if (Path(spec.cfg.model.hf_dir) / "config.json").is_file() else None
        try:
            validate(spec.cfg, 1, arch)
        except ConfigError as exc:
            problems.append(f"variant {spec.variant.name!r} seed {spec.seed}: {exc}")
    if problems:
        raise GridError("\n".join(problems))
