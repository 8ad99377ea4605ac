"""``tools/run_ablation.py``: plan a grid (every run's config validated, budgets checked), run it resumably, write
the report."""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
from pathlib import Path

from vapo_megatron.ablation.figure import append_figure_section
from vapo_megatron.ablation.grid import BudgetError, GridError, budget, load_grid, plan_runs, validate_runs
from vapo_megatron.ablation.report import failure_lines, read_manifest, write_manifest, write_report
from vapo_megatron.ablation.runner import StaleRunError, run_grid, train_command

PID_FILE = "runner.pid"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_ablation.py", description="Run the VAPO ablation grid (variants x seeds "
                                "of vapo-train, resumable) and write docs/ablation.md and docs/ablation.png.")
    p.add_argument("--grid", default="examples/ablation/grid.yaml", help="grid file (variants and base config)")
    p.add_argument("--base", default=None, help="base config instead of the grid's")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run only these variants")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at the same time")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="cores shared by the jobs (OMP threads)")
    p.add_argument("--out", default="runs/ablation", help="run directories: OUT/<variant>/seed<S>")
    p.add_argument("--set", nargs="+", action="extend", default=[], dest="extra", metavar="KEY=VALUE",
                   help="overrides for every variant, applied before the variant's own (e.g. train.steps=40)")
    p.add_argument("--report", default="docs/ablation.md", help="Markdown report; the PNG goes next to it")
    p.add_argument("--threshold", type=float, default=None, help="absolute validation accuracy for 'steps to "
                   "threshold' (default: each run's initial accuracy + --threshold-delta)")
    p.add_argument("--threshold-delta", type=float, default=0.1)
    p.add_argument("--first-column", choices=("final", "auc"), default="final",
                   help="the report's first figure column: final validation accuracy, or the area under the curve")
    p.add_argument("--report-only", action="store_true", help="rebuild the report from OUT, run nothing")
    p.add_argument("--dry-run", action="store_true", help="validate, check budgets, print the commands, run nothing")
    p.add_argument("--figure-variants", nargs="+", default=None, metavar="VARIANT",
                   help="also plot reward/entropy/length/ev_mc curves of these variants and a first-wrong-step "
                        "credit table into the report")
    p.add_argument("--pause", action="store_true", help="SIGSTOP the grid running in OUT (runner and every run)")
    p.add_argument("--continue", action="store_true", dest="cont", help="SIGCONT a paused grid in OUT")
    return p


def signal_grid(out: Path, sig: int) -> int:
    """Send ``sig`` to the runner of the grid in ``out`` (its PID file) and to all its descendants; returns how
    many processes got it. Children are signalled first on SIGSTOP and last on SIGCONT."""
    import psutil

    pid_file = out / PID_FILE
    if not pid_file.is_file():
        raise FileNotFoundError(f"no grid is running in {out} ({pid_file} is missing)")
    try:
        runner = psutil.Process(int(pid_file.read_text()))
        procs = [*runner.children(recursive=True), runner]
    except psutil.NoSuchProcess:
        raise FileNotFoundError(f"the grid runner of {out} (PID {pid_file.read_text().strip()}) is gone") from None
    for proc in procs if sig == signal.SIGSTOP else reversed(procs):
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(sig)
    return len(procs)


def _run(args: argparse.Namespace, command: str) -> int:
    grid = load_grid(args.grid, base=args.base, only=args.only)
    specs = plan_runs(grid, args.seeds, args.out, args.extra)
    validate_runs(specs)
    print("[ablation] equal budget of every run: " + ", ".join(f"{k} = {v}" for k, v in budget(specs[0].cfg).items()))
    if args.dry_run:
        print("\n".join(" ".join(shlex.quote(a) for a in train_command(grid.base, s)) for s in specs))
        return 0
    write_manifest(Path(args.out), grid.base, specs, command, task=grid.task)
    pid_file = Path(args.out) / PID_FILE
    pid_file.write_text(str(os.getpid()))
    try:
        result = run_grid(grid.base, specs, jobs=args.jobs, cores=args.cores)
    finally:
        pid_file.unlink(missing_ok=True)
    for spec, code, log in result.failed:
        print(f"[ablation] FAILED {spec.variant.name} seed {spec.seed} (exit {code}): see {log}", file=sys.stderr)
    return 1 if result.failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    if args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    command = "python tools/run_ablation.py " + shlex.join(argv)
    if args.pause or args.cont:
        try:
            n = signal_grid(Path(args.out), signal.SIGSTOP if args.pause else signal.SIGCONT)
        except FileNotFoundError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"[ablation] {'paused' if args.pause else 'continued'} {n} processes of the grid in {args.out}")
        return 0
    try:
        code = 0 if args.report_only else _run(args, command)
        if args.dry_run:
            return code
        md, png = write_report(Path(args.out), Path(args.report), args.threshold, args.threshold_delta,
                               args.first_column)
        if args.figure_variants:
            names = [v["name"] for v in read_manifest(Path(args.out))["variants"]]
            append_figure_section(Path(args.out), md, args.figure_variants, names)
    except (GridError, BudgetError, StaleRunError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for line in failure_lines(Path(args.out), read_manifest(Path(args.out))):
        print(f"[ablation] {line}")
    print(f"[ablation] report: {md} and {png}")
    return code
