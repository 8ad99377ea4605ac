"""Run an ablation grid: one ``vapo-train`` subprocess per (variant, seed), ``jobs`` at a time, each with its own
rendezvous port and ``cores / jobs`` threads. A run that exits 0 gets a ``DONE`` file (wall time, config hash) and
is skipped next time, so an interrupted grid continues where it stopped; a run without ``DONE`` resumes from its
newest complete checkpoint (same config) or is cleared and run again; a failure is reported with its log and does
not stop the others. The runner writes its PID to ``<out>/runner.pid`` so that a grid can be paused while the test
suite runs (``tools/run_ablation.py --pause/--continue --out OUT``)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vapo_megatron.ablation.grid import RunSpec
from vapo_megatron.config import dump_yaml

DONE, LOG = "DONE", "train.log"


class StaleRunError(RuntimeError):
    """A finished run directory holds a different config than the one the grid would run now."""


@dataclass
class GridResult:
    done: list[RunSpec] = field(default_factory=list)
    """Runs that finished in this invocation."""
    skipped: list[RunSpec] = field(default_factory=list)
    """Runs finished by an earlier invocation."""
    failed: list[tuple[RunSpec, int, Path]] = field(default_factory=list)
    """(run, exit code, log path) of each failure."""


def config_hash(spec: RunSpec) -> str:
    return hashlib.sha256(dump_yaml(spec.cfg).encode()).hexdigest()[:16]


def is_finished(spec: RunSpec) -> bool:
    """True if ``spec`` finished earlier; StaleRunError if that run had another config (the base config or the
    grid changed since: use another --out, or delete the directory to run it again)."""
    marker = spec.run_dir / DONE
    if not marker.is_file():
        return False
    recorded = json.loads(marker.read_text()).get("config_hash")
    if recorded != config_hash(spec):
        raise StaleRunError(f"{spec.run_dir} finished with another config (hash {recorded}, now "
                            f"{config_hash(spec)}; compare its config.yaml): delete it or use another --out")
    return True


def train_command(base: str, spec: RunSpec) -> list[str]:
    """The trainer's command line: ``vapo-train`` run by this interpreter."""
    return [sys.executable, "-m", "vapo_megatron.cli", "--config", base, *spec.overrides]


def _run_env(port: int, threads: int) -> dict[str, str]:
    # The trainer imports this checkout's package, whatever an installed copy says.
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="1", RANK="0",
               LOCAL_RANK="0", OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", PYTHONPATH=path)
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _launch(base: str, spec: RunSpec, port: int, threads: int) -> tuple[subprocess.Popen, float]:
    """Start one run. An interrupted run with a complete checkpoint of its own config continues from it
    (`--resume`: the trainer drops metrics logged after that checkpoint); without one its directory is cleared."""
    command = train_command(base, spec)
    if _resumable(spec):
        command.append("--resume")
    elif spec.run_dir.exists():
        shutil.rmtree(spec.run_dir)
    spec.run_dir.mkdir(parents=True, exist_ok=True)
    with open(spec.run_dir / LOG, "a") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env=_run_env(port, threads), start_new_session=True)
    return proc, time.time()


def _resumable(spec: RunSpec) -> bool:
    from vapo_megatron.engine.checkpoint import latest_checkpoint

    saved = spec.run_dir / "config.yaml"
    return (latest_checkpoint(spec.run_dir) is not None and saved.is_file()
            and saved.read_text() == dump_yaml(spec.cfg))


def _free_port(taken: set[int]) -> int:
    from vapo_megatron.platform import free_port

    while (port := free_port()) in taken:
        pass
    return port


def _eta(walls: list[float], remaining: int, jobs: int) -> str:
    if not walls:
        return "ETA: after the first run"
    seconds = sum(walls) / len(walls) * remaining / jobs
    return f"ETA {seconds / 60:.0f} min" if seconds >= 60 else f"ETA {seconds:.0f} s"


def run_grid(base: str, specs: Sequence[RunSpec], jobs: int = 1, cores: int | None = None,
             log: Callable[[str], None] = print, poll_s: float = 2.0) -> GridResult:
    """Run every unfinished spec, ``jobs`` at a time; returns what finished, was skipped or failed."""
    result = GridResult(skipped=[s for s in specs if is_finished(s)])
    todo = [s for s in specs if s not in result.skipped]
    threads = max(1, (cores or os.cpu_count() or 1) // jobs)
    log(f"[ablation] {len(specs)} runs: {len(result.skipped)} already finished, {len(todo)} to run, {jobs} at a "
        f"time with OMP_NUM_THREADS={threads}")
    running: dict[int, tuple[RunSpec, subprocess.Popen, float]] = {}
    walls: list[float] = []
    try:
        while todo or running:
            while todo and len(running) < jobs:
                spec, port = todo.pop(0), _free_port(set(running))
                running[port] = (spec, *_launch(base, spec, port, threads))
                log(f"[ablation] start {spec.variant.name} seed {spec.seed} -> {spec.run_dir / LOG}")
            time.sleep(poll_s)
            for port, (spec, proc, t0) in list(running.items()):
                if proc.poll() is not None:
                    del running[port]
                    walls.append(time.time() - t0)
                    _finish(spec, proc.returncode, walls[-1], result)
                    log(_progress(spec, proc.returncode, walls, result, len(todo) + len(running), jobs))
    finally:  # interrupted: stop the runs this call started; their dirs lack DONE and are redone next time
        for _, proc, _ in running.values():  # the session of each run we started: vLLM and reward workers too
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    return result


def _progress(spec: RunSpec, code: int, walls: list[float], result: GridResult, remaining: int, jobs: int) -> str:
    finished = len(result.done) + len(result.failed)
    status = "ok" if code == 0 else f"FAILED (exit {code}, log {spec.run_dir / LOG})"
    return (f"[ablation] {finished}/{finished + remaining} {spec.variant.name} seed {spec.seed} {status} in "
            f"{walls[-1]:.0f} s; {_eta(walls, remaining, jobs)}")


def _finish(spec: RunSpec, returncode: int, wall: float, result: GridResult) -> None:
    if returncode == 0:
        (spec.run_dir / DONE).write_text(json.dumps({"wall_s": wall, "config_hash": config_hash(spec),
                                                     "finished": time.strftime("%Y-%m-%d %H:%M:%S")}))
        result.done.append(spec)
    else:
        result.failed.append((spec, returncode, spec.run_dir / LOG))
