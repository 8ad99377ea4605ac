"""Training curves in the style of the paper's Figure 2 (reward, entropy, response length and the critic's
explained variance against the Monte-Carlo return, per PPO step) for some variants of a grid, each the mean over
its finished seeds with a min-max band; and the first-wrong-step credit numbers of each variant.

    python tools/run_ablation.py --out OUT --report-only --figure-variants vapo dapo
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path

from vapo_megatron.ablation.report import finished_rows, is_finite_number

PANELS = (("reward_mean", "training reward"), ("policy/entropy", "policy entropy"),
          ("response_length_mean", "response length (tokens)"), ("ev_mc", "critic ev_mc"),
          ("ev_oracle", "critic ev_oracle (vs Monte-Carlo values)"))
SPARSE = {"ev_oracle"}
"""Keys logged every few steps only (the probe): plotted unsmoothed."""
CREDIT_KEYS = ("credit_first_error_adv", "credit_rest_wrong_adv", "credit_first_error_gap")


def ppo_rows(run_dir: Path) -> list[dict] | None:
    """The PPO-phase rows of a finished run's metrics.jsonl (None when the run has no DONE file)."""
    rows = finished_rows(run_dir)
    return None if rows is None else [r for r in rows if r.get("phase") == "ppo"]


def smooth(xs: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (the first points average what exists so far)."""
    return [statistics.fmean(xs[max(0, i - window + 1): i + 1]) for i in range(len(xs))]


def variant_runs(out: Path, variant: str) -> list[list[dict]]:
    """PPO rows of every finished seed of ``variant`` in the grid folder ``out``."""
    found = [ppo_rows(d) for d in sorted((out / variant).glob("seed*"))]
    return [rows for rows in found if rows]


def curve_band(runs: list[list[dict]], key: str, window: int) -> tuple[list[int], list[float], list[float],
                                                                          list[float]]:
    """(steps, mean, min, max) over seeds of the smoothed per-step ``key``; steps where a seed lacks it are cut."""
    series = []
    for rows in runs:
        points = [(i + 1, r[key]) for i, r in enumerate(rows) if is_finite_number(r.get(key))]
        if points:
            series.append(dict(zip([s for s, _ in points], smooth([v for _, v in points], window))))
    if not series:
        return [], [], [], []
    steps = sorted(set.intersection(*(set(s) for s in series)))
    cols = [[s[t] for s in series] for t in steps]
    return steps, [statistics.fmean(c) for c in cols], [min(c) for c in cols], [max(c) for c in cols]


def plot_curves(out: Path, variants: Sequence[str], path: Path, window: int = 5) -> Path:
    """Write the figure (one panel per PANELS entry) for ``variants`` to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for variant in variants:
        runs = variant_runs(out, variant)
        for ax, (key, _) in zip(axes, PANELS):
            steps, mean, lo, hi = curve_band(runs, key, 1 if key in SPARSE else window)
            if steps:
                line, = ax.plot(steps, mean, label=f"{variant} ({len(runs)} seeds)")
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
    for ax, (_, title) in zip(axes, PANELS):
        ax.set_title(title)
        ax.set_xlabel("PPO step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"mean over seeds (min-max band), {window}-step moving average", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def credit_summary(runs: list[list[dict]]) -> dict[str, float] | None:
    """Means over every PPO step of every seed of the first-wrong-step credit metrics, and the ratio of the mean
    advantage on the first wrong step to that on the rest of the wrong responses; None without such rows."""
    sums = {k: [r[k] for rows in runs for r in rows if is_finite_number(r.get(k))] for k in CREDIT_KEYS}
    if not sums["credit_first_error_adv"] or not sums["credit_rest_wrong_adv"]:
        return None
    out = {k: statistics.fmean(v) for k, v in sums.items() if v}
    rest = out["credit_rest_wrong_adv"]
    out["ratio"] = out["credit_first_error_adv"] / rest if rest != 0 else math.nan
    out["steps"] = len(sums["credit_first_error_adv"])
    return out


def append_figure_section(out: Path, md_path: Path, variants: Sequence[str], all_variants: Sequence[str]) -> Path:
    """Plot ``variants`` next to the report (``<report>_curves.png``) and append that figure and a table of the
    first-wrong-step credit of every variant in ``all_variants`` to the report; returns the PNG's path."""
    png = plot_curves(out, variants, md_path.with_name(md_path.stem + "_curves.png"))
    lines = ["", "## Training curves (Figure 2 style)", "", f"![curves]({png.name})", "",
             "## Credit on the first wrong step", "",
             "Mean advantage (after whitening, where the variant whitens) on the tokens of each wrong response's "
             "first wrong step, against the rest of the same wrong responses; means over every PPO step of every "
             "finished seed. `gap` is the per-response difference (first minus rest), exactly 0 for value-free "
             "advantages, which give every token of a response the same advantage.", "",
             "| variant | first wrong step | rest of wrong response | ratio first/rest | gap | PPO steps |",
             "|---|---|---|---|---|---|"]
    for variant in all_variants:
        s = credit_summary(variant_runs(out, variant))
        if s is None:
            lines.append(f"| {variant} | — | — | — | — | 0 |")
            continue
        lines.append(f"| {variant} | {s['credit_first_error_adv']:.3f} | {s['credit_rest_wrong_adv']:.3f} | "
                     f"{s['ratio']:.2f} | {s.get('credit_first_error_gap', math.nan):.3f} | {s['steps']} |")
    with md_path.open("a") as f:
        f.write("\n".join(lines) + "\n")
    return png
