"""The ablation report: per-run numbers from ``metrics.jsonl`` (initial, final and best validation accuracy, first
PPO step reaching a threshold, wall time), their mean and spread over seeds, next to the paper's Table 1, as
Markdown and a PNG of the mean validation-accuracy curves with a min-max band over seeds.

``manifest.json`` in the output folder records what the grid ran (command, machine, base config text, resolved
overrides, budget) so that ``--report-only`` rebuilds the same report later from the run directories alone."""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vapo_megatron.ablation.grid import GridError, RunSpec, budget
from vapo_megatron.ablation.runner import DONE, LOG

MANIFEST = "manifest.json"
EV_MC_LAST = 5
"""PPO steps averaged into a run's final ev_mc."""


@dataclass(frozen=True)
class RunResult:
    initial: float | None
    """Validation accuracy before any update (the "init" row)."""
    curve: tuple[tuple[int, float], ...]
    """(PPO step, validation accuracy) of every PPO evaluation, in order; value pretraining steps not counted."""
    wall_s: float | None
    """Wall time of the whole run (process start to exit), from DONE."""
    ev_mc_pretrain: float | None = None
    """The critic's ev_mc (explained variance against the Monte-Carlo return) at the last value-pretraining step."""
    ev_mc_final: float | None = None
    """Mean ev_mc over the last EV_MC_LAST PPO steps that have a finite one."""
    ev_mc_ppo: float | None = None
    """Mean ev_mc over every PPO step that has a finite one."""
    ev_oracle_ppo: float | None = None
    """Mean ev_oracle (the critic against Monte-Carlo values, values/mc.py) over the PPO steps that probed."""
    pretrain_steps: int = 0
    """Value-pretraining steps run (each one rollout batch beyond the equal PPO budget)."""
    mc_samples: int = 0
    """Monte-Carlo continuations sampled (value source and probe), also beyond the PPO budget."""

    @property
    def auc(self) -> float | None:
        """The area under the validation curve: mean validation accuracy over the PPO evaluations (step 0 out)."""
        return statistics.fmean(v for _, v in self.curve) if self.curve else None

    @property
    def final(self) -> float | None:
        return self.curve[-1][1] if self.curve else None

    @property
    def best(self) -> float | None:
        return max(v for _, v in self.curve) if self.curve else None

    def steps_to(self, threshold: float) -> int | None:
        """First PPO step whose validation accuracy reaches ``threshold``; None if none does."""
        return next((s for s, v in self.curve if v >= threshold), None)


def finished_rows(run_dir: Path) -> list[dict] | None:
    """Every row of a finished run's metrics.jsonl (DONE written), None otherwise."""
    if not (run_dir / DONE).is_file():
        return None
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def read_run(run_dir: Path) -> RunResult | None:
    """The numbers of a finished run (DONE written), None otherwise."""
    rows = finished_rows(run_dir)
    if rows is None:
        return None
    pretrain = sum(r["phase"] == "value_pretrain" for r in rows)  # may stop early at the EV threshold
    initial = next((r["val_accuracy"] for r in rows if r["phase"] == "init" and "val_accuracy" in r), None)
    curve = tuple((r["step"] - pretrain, r["val_accuracy"]) for r in rows
                  if r["phase"] == "ppo" and "val_accuracy" in r)
    mc = sum(int(r.get("mc_requests", 0)) + int(r.get("probe_requests", 0)) for r in rows)
    return RunResult(initial, curve, json.loads((run_dir / DONE).read_text()).get("wall_s"), *_ev_mc(rows),
                     pretrain_steps=pretrain, mc_samples=mc)


def is_finite_number(value: Any) -> bool:
    """A logged metric that is a real number (not missing, not NaN or inf)."""
    return isinstance(value, (int, float)) and math.isfinite(value)


def _finite(rows: list[dict], key: str, phase: str) -> list[float]:
    """The finite values of ``key`` in the rows of ``phase``, in order."""
    return [r[key] for r in rows if r["phase"] == phase and is_finite_number(r.get(key))]


def _ev_mc(rows: list[dict]) -> tuple[float | None, float | None, float | None, float | None]:
    """ev_mc at the end of value pretraining, over the last PPO steps and over all PPO steps, and ev_oracle over the
    PPO steps; None where the rows have none. Only ev_mc is used: `explained_variance` is against each variant's
    own critic targets, not comparable."""
    def mean(xs: list[float]) -> float | None:
        return statistics.fmean(xs) if xs else None

    pretrain, ppo = _finite(rows, "ev_mc", "value_pretrain"), _finite(rows, "ev_mc", "ppo")
    return ((pretrain[-1] if pretrain else None), mean(ppo[-EV_MC_LAST:]), mean(ppo),
            mean(_finite(rows, "ev_oracle", "ppo")))


def write_manifest(out: Path, base: str, specs: Sequence[RunSpec], command: str, task: str = "") -> dict[str, Any]:
    """Record what the grid runs in ``out/manifest.json``: command, date, machine, base config text, overrides,
    each variant's seeds, and the grid file's description of the task.

    A grid run in parts (``--only vapo``, then ``--only ppo``, perhaps at other seeds) accumulates: the variants
    and seeds of earlier calls stay, a variant named again takes this call's entry and the union of its seeds,
    and ``commands`` lists every call. So ``--report-only`` reports every row that ran into ``out``. A call with
    another base config text, budget or common overrides than the manifest's raises GridError: its rows would
    not be comparable."""
    first: dict[str, RunSpec] = {}
    seeds: dict[str, set[int]] = {}
    for spec in specs:
        first.setdefault(spec.variant.name, spec)
        seeds.setdefault(spec.variant.name, set()).add(spec.seed)
    base_text, grid_budget = Path(base).read_text(encoding="utf-8"), budget(specs[0].cfg)
    earlier = json.loads((out / MANIFEST).read_text()) if (out / MANIFEST).is_file() else None
    common = list(specs[0].common)
    if earlier is not None and (earlier["base_text"] != base_text or earlier["budget"] != grid_budget
                                or earlier["common"] != common):
        what = "base config text" if earlier["base_text"] != base_text else \
            f"budget ({earlier['budget']} there, {grid_budget} here)" if earlier["budget"] != grid_budget else \
            f"set of common overrides ({earlier['common']} there, {common} here)"
        raise GridError(f"{out} holds the runs of a grid with another {what}: its rows and these would not be "
                        f"comparable; give another --out (or move {out / MANIFEST} away to start afresh)")
    variants = {v["name"]: v for v in (earlier or {}).get("variants", [])}
    for name, s in first.items():
        old = set(variants.get(name, {}).get("seeds", []))
        variants[name] = {"name": name, "paper": s.variant.paper, "group": s.variant.group,
                          "overrides": list(s.variant.overrides), "resolved": list(s.resolved),
                          "note": s.variant.note, "seeds": sorted(old | seeds[name]),
                          "value_pretrain_steps": s.cfg.algorithm.value_pretrain_steps if s.cfg.algorithm.use_critic
                          else 0}
    manifest = {
        "command": command, "commands": [*(earlier or {}).get("commands", []), command],
        "date": (earlier or {}).get("date") or time.strftime("%Y-%m-%d %H:%M %Z"), "task": task,
        "machine": f"{platform.node()}: {os.cpu_count()} cores, {platform.machine()}, {platform.system()} "
                   f"{platform.release()}, Python {platform.python_version()}",
        "base": base, "base_text": base_text, "common": common,
        "seeds": sorted({x for v in variants.values() for x in v["seeds"]}), "budget": grid_budget,
        "variants": list(variants.values()),
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(out / MANIFEST)
    return manifest


def variant_seeds(manifest: dict[str, Any], variant: dict[str, Any]) -> list[int]:
    """The seeds `variant` ran at (manifests before per-variant seeds: the grid's)."""
    return variant.get("seeds", manifest["seeds"])


def read_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: run the grid into {out} first (without --report-only)")
    return json.loads(path.read_text())


def collect(out: Path, manifest: dict[str, Any]) -> dict[str, dict[int, RunResult | None]]:
    """variant -> seed -> its RunResult (None: not finished)."""
    return {v["name"]: {s: read_run(out / v["name"] / f"seed{s}") for s in variant_seeds(manifest, v)}
            for v in manifest["variants"]}


def mean_std(xs: Sequence[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for one value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def fmt(xs: Sequence[float], digits: int = 3) -> str:
    if not xs:
        return "—"
    mean, std = mean_std(xs)
    return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")


def threshold_of(run: RunResult, absolute: float | None, delta: float) -> float | None:
    if absolute is not None:
        return absolute
    return None if run.initial is None else run.initial + delta


def summary_row(runs: dict[int, RunResult | None], absolute: float | None, delta: float,
                samples_per_step: int | None = None) -> dict[str, str]:
    """The table cells of one variant."""
    done = {s: r for s, r in runs.items() if r is not None}
    finals = [r.final for r in done.values() if r.final is not None]
    reach = [r.steps_to(t) for r in done.values() if (t := threshold_of(r, absolute, delta)) is not None]
    reached = [s for s in reach if s is not None]
    not_reached = len(reach) - len(reached)
    walls = [r.wall_s / 60 for r in done.values() if r.wall_s is not None]
    per_step = samples_per_step or 0
    return {
        "auc": fmt([r.auc for r in done.values() if r.auc is not None]),
        "extra": fmt([float(r.pretrain_steps * per_step) for r in done.values()], 0) + " + "
        + fmt([float(r.mc_samples) for r in done.values()], 0),
        "ev_mc_ppo": fmt([r.ev_mc_ppo for r in done.values() if r.ev_mc_ppo is not None]),
        "ev_oracle": fmt([r.ev_oracle_ppo for r in done.values() if r.ev_oracle_ppo is not None]),
        "runs": f"{len(done)}/{len(runs)}",
        "final": fmt(finals),
        "per_seed": ", ".join(f"{s}: {r.final:.3f}" for s, r in done.items() if r.final is not None) or "—",
        "best": fmt([r.best for r in done.values() if r.best is not None]),
        "steps": (fmt(reached, 1) if reached else "—") + (f" ({not_reached} not reached)" if not_reached else ""),
        "initial": fmt([r.initial for r in done.values() if r.initial is not None]),
        "wall": fmt(walls, 1),
        "ev_mc": fmt([r.ev_mc_pretrain for r in done.values() if r.ev_mc_pretrain is not None]) + " / "
        + fmt([r.ev_mc_final for r in done.values() if r.ev_mc_final is not None]),
    }


def _threshold_text(absolute: float | None, delta: float) -> str:
    if absolute is not None:
        return f"validation accuracy >= {absolute:g}"
    return f"validation accuracy >= the run's initial validation accuracy + {delta:g}"


def render_markdown(manifest: dict[str, Any], results: dict[str, dict[int, RunResult | None]], png_name: str,
                    absolute: float | None = None, delta: float = 0.1, first: str = "final") -> str:
    """The whole report as Markdown; `first` ("final" or "auc") is the first figure column."""
    b = manifest["budget"]
    per_step = b['samples per PPO step (rollout.num_prompts x rollout.n)']
    lines = [
        "# Ablation: VAPO vs vanilla PPO vs DAPO, and VAPO without each component (Table 1 in miniature)", "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M %Z')} from the runs of "
        f"{', '.join(f'`{c}`' for c in manifest.get('commands', [manifest['command']]))} "
        f"(started {manifest['date']}).", "",
        f"Machine: {manifest['machine']}.", "",
        f"**What is compared.** {manifest.get('task') or 'The model and task of the base config (below)'}, not "
        "Qwen2.5-32B on AIME: only the *ordering* of the variants can be held against the paper's Table 1 "
        "(AIME24 avg@32), not the numbers. Every variant generates the same number of samples per PPO step "
        f"({b['samples per PPO step (rollout.num_prompts x rollout.n)']}) for the same number of PPO steps "
        f"({b['PPO steps (train.steps)']}), and is evaluated the same way (every {b['eval.every']} PPO steps, "
        f"avg@{b['eval.n']} on at most {b['eval.max_prompts']} validation prompts); the runner refuses a grid where "
        "this does not hold. Value pretraining steps are extra rollouts for the critic, as in the paper (column "
        "'value pretrain'). PPO step 0 is the evaluation before any update.", "",
        f"Steps to threshold: first PPO step with {_threshold_text(absolute, delta)}; mean over the seeds that "
        "reached it. Spreads are the sample standard deviation over seeds (n - 1).", "",
        f"Critic ev_mc: explained variance of the critic's values against the Monte-Carlo return (the final reward "
        f"on every token), the same target for every variant, at the last value-pretraining step / averaged over "
        f"the last {EV_MC_LAST} PPO steps ('—': not logged or undefined); 'ev_mc PPO mean' averages it over every "
        "PPO step. ev_oracle: the critic's explained variance against Monte-Carlo values at the step boundaries of "
        "a few responses (mc.probe_every), averaged over the PPO steps that probed. For a variant without a critic "
        "that runs on Monte-Carlo values, ev_mc is those values' own.", "",
        "AUC: the area under the validation curve, the mean validation accuracy over the PPO evaluations (step 0 "
        "excluded). Extra samples: value-pretraining rollouts + Monte-Carlo continuations per run, beyond the equal "
        "PPO budget.", "",
        "## Results", "",
    ]
    auc_first = first == "auc"
    head = ["AUC val acc", "final val acc"] if auc_first else ["final val acc", "AUC val acc"]
    lines += [f"| variant | paper Table 1 | {head[0]} | {head[1]} | final per seed | best val acc | steps to "
              "threshold | initial val acc | extra samples | wall min/run | runs | critic ev_mc (pretrain end / "
              "final) | ev_mc PPO mean | ev_oracle PPO mean |", "|---" * 14 + "|"]
    for v in manifest["variants"]:
        row = summary_row(results[v["name"]], absolute, delta, per_step)
        paper = "—" if v["paper"] is None else f"{v['paper']:g}"
        one, two = (row["auc"], row["final"]) if auc_first else (row["final"], row["auc"])
        lines.append(f"| {v['name']} | {paper} | {one} | {two} | {row['per_seed']} | {row['best']} | "
                     f"{row['steps']} | {row['initial']} | {row['extra']} | {row['wall']} | {row['runs']} | "
                     f"{row['ev_mc']} | {row['ev_mc_ppo']} | {row['ev_oracle']} |")
    lines += ["", f"![validation accuracy vs PPO step]({png_name})", "", "## Variants", "",
              "| variant | value pretrain steps | overrides on top of the base (as run) | note |", "|---|---|---|---|"]
    for v in manifest["variants"]:
        resolved = " ".join(f"`{o}`" for o in v["resolved"]) or "(none: the base config)"
        lines.append(f"| {v['name']} | {v['value_pretrain_steps']} | {resolved} | {v.get('note', '')} |")
    common = " ".join(f"`{o}`" for o in manifest["common"]) or "(none)"
    lines += ["", f"Overrides for every variant: {common}; plus `train.seed=S`, `checkpoint.run_dir=OUT/<variant>/"
              "seed<S>`, `checkpoint.export_hf_at_end=false`, `logging.progress_bar=false`.", "",
              f"## Base config (`{manifest['base']}` when the grid ran)", "", "```yaml",
              manifest["base_text"].rstrip(), "```", ""]
    return "\n".join(lines)


def _band(runs: dict[int, RunResult | None]) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps evaluated by every finished seed (step 0 = initial), with the mean, min and max over seeds."""
    curves = [dict(((0, r.initial),) if r.initial is not None else ()) | dict(r.curve)
              for r in runs.values() if r is not None]
    steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
    vals = [[c[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def plot_report(manifest: dict[str, Any], results: dict[str, dict[int, RunResult | None]], path: Path) -> Path:
    """Two panels: the methods (VAPO, PPO, DAPO), and VAPO against each ablation; mean and min-max band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    panels = (("VAPO vs vanilla PPO vs DAPO", lambda v: v["group"] == "method"),
              ("VAPO without one component", lambda v: v["group"] != "method" or v["name"] == "vapo"))
    colors = plt.get_cmap("tab10").colors
    for ax, (title, keep) in zip(axes, panels):
        for i, v in enumerate(v for v in manifest["variants"] if keep(v)):
            steps, mean, lo, hi = _band(results[v["name"]])
            if not steps:
                continue
            style = {"color": "black", "lw": 2.2} if v["name"] == "vapo" else {"color": colors[i % 10]}
            paper = "" if v["paper"] is None else f" (paper {v['paper']:g})"
            ax.plot(steps, mean, marker="o", ms=3, label=v["name"] + paper, **style)
            ax.fill_between(steps, lo, hi, alpha=0.12, color=style["color"])
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"validation accuracy (mean over seeds {manifest['seeds']}, band min-max)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def write_report(out: Path, md_path: Path, absolute: float | None = None, delta: float = 0.1,
                 first: str = "final") -> tuple[Path, Path]:
    """Markdown and PNG from the manifest and run directories of ``out``; returns their paths."""
    manifest = read_manifest(out)
    results = collect(out, manifest)
    png = md_path.with_suffix(".png")
    md_path.parent.mkdir(parents=True, exist_ok=True)
    plot_report(manifest, results, png)
    md_path.write_text(render_markdown(manifest, results, png.name, absolute, delta, first), encoding="utf-8")
    return md_path, png


def failure_lines(out: Path, manifest: dict[str, Any]) -> list[str]:
    """A line per run directory without DONE: where its log is."""
    return [f"{v['name']} seed {s}: not finished, log {out / v['name'] / f'seed{s}' / LOG}"
            for v in manifest["variants"] for s in variant_seeds(manifest, v)
            if not (out / v["name"] / f"seed{s}" / DONE).is_file()]
