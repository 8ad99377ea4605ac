"""The ablation grid, runner and report without the trainer: override expansion and placeholders, the equal-budget
check, the report's numbers against a hand computation, and resumability (a fake trainer command stands in)."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import pytest
import yaml

from vapo_megatron.ablation import runner
from vapo_megatron.ablation.cli import main
from vapo_megatron.ablation.grid import BudgetError, GridError, load_grid, plan_runs
from vapo_megatron.ablation.report import collect, read_manifest, summary_row, write_manifest, write_report
from vapo_megatron.ablation.runner import DONE, StaleRunError, config_hash, run_grid

REPO = Path(__file__).resolve().parents[2]
BASE = {"model": {"hf_dir": "m"}, "data": {"train_files": ["t.jsonl"], "val_files": ["v.jsonl"]},
        "rollout": {"num_prompts": 8, "n": 4}, "train": {"steps": 6, "mini_batch_size": 16},
        "algorithm": {"value_pretrain_steps": 2}, "eval": {"every": 2}}


def _grid(tmp_path: Path, variants: dict, **top) -> Path:
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(BASE))
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump({"base": str(tmp_path / "base.yaml"), "variants": variants, **top}, sort_keys=False))
    return path


def test_variant_expansion_order_and_placeholders(tmp_path):
    """Failure: overrides are merged in the wrong order (a variant must win over --set, --set over the grid's
    set), or a ${expr} placeholder is not evaluated against the base config after --set."""
    grid = load_grid(_grid(tmp_path, {"vapo": None, "single": {"overrides": [
        "rollout.n=1", "rollout.num_prompts=${rollout.num_prompts * rollout.n}"]}}, set=["train.steps=3"]))
    specs = plan_runs(grid, [0, 5], tmp_path / "out", ["rollout.num_prompts=2", "train.steps=4"])
    assert [(s.variant.name, s.seed) for s in specs] == [("vapo", 0), ("single", 0), ("vapo", 5), ("single", 5)]
    single = specs[3]
    assert single.resolved == ("rollout.n=1", "rollout.num_prompts=8")  # 2 (from --set) x 4
    assert single.cfg.rollout.num_prompts == 8 and single.cfg.rollout.n == 1 and single.cfg.train.steps == 4
    assert single.cfg.train.seed == 5 and single.cfg.checkpoint.run_dir == str(tmp_path / "out" / "single" / "seed5")
    assert single.overrides[:2] == ("train.steps=3", "rollout.num_prompts=2")
    assert not single.cfg.checkpoint.export_hf_at_end and not single.cfg.logging.progress_bar
    assert [v.name for v in load_grid(_grid(tmp_path, {"a": None, "b": None, "c": None}), only=["c", "a"]).variants] \
        == ["c", "a"]


def test_repository_grids_keep_the_budget():
    """Failure: examples/ablation/grid.yaml lost a Table 1 variant or breaks the equal sample budget; smoke.yaml
    no longer includes it."""
    grid = load_grid(REPO / "examples/ablation/grid.yaml", base=str(REPO / "examples/tiny_cpu/vapo.yaml"))
    names = [v.name for v in grid.variants]
    assert names == ["vapo", "ppo", "dapo", "no_value_pretrain", "no_decoupled_gae", "no_length_adaptive",
                     "no_clip_higher", "no_token_loss", "no_positive_lm", "no_group_sampling"]
    specs = {s.variant.name: s.cfg for s in plan_runs(grid, [0], "out")}
    base = specs["vapo"].rollout
    for name in ("ppo", "no_group_sampling"):
        assert specs[name].rollout.n == 1 and specs[name].rollout.num_prompts == base.num_prompts * base.n
    assert specs["no_clip_higher"].algorithm.eps_high == specs["vapo"].algorithm.eps_low
    assert specs["no_decoupled_gae"].algorithm.couple_gae and specs["dapo"].algorithm.advantage == "grpo"
    smoke = load_grid(REPO / "examples/ablation/smoke.yaml", base=str(REPO / "examples/tiny_cpu/vapo.yaml"))
    assert [v.name for v in smoke.variants] == ["vapo", "ppo", "dapo"] and "train.steps=2" in smoke.common


def test_unequal_budget_is_rejected_with_the_numbers(tmp_path, capsys):
    """Failure: a variant that generates fewer samples per step or runs more PPO steps is not refused, or the
    message does not say which variant and which numbers."""
    path = _grid(tmp_path, {"vapo": None, "fewer": {"overrides": ["rollout.n=1"]},
                            "longer": {"overrides": ["train.steps=7"]}})
    with pytest.raises(BudgetError) as err:
        plan_runs(load_grid(path), [0], tmp_path / "out")
    text = str(err.value)
    assert "fewer (seed 0): samples per PPO step (rollout.num_prompts x rollout.n) = 8, but vapo has 32" in text
    assert "longer (seed 0): PPO steps (train.steps) = 7, but vapo has 6" in text
    assert main(["--grid", str(path), "--out", str(tmp_path / "out"), "--dry-run"]) == 2
    assert "would not be compared on the same budget" in capsys.readouterr().err


@pytest.mark.parametrize("expr, message", [("rollout.nope * 2", "'rollout.nope' is not a config field"),
                                           ("__import__('os')", "unsupported expression"),
                                           ("rollout.n *", "invalid syntax")])
def test_bad_placeholder_names_the_problem(tmp_path, expr, message):
    grid = load_grid(_grid(tmp_path, {"bad": {"overrides": [f"rollout.num_prompts=${{{expr}}}"]}}))
    with pytest.raises(GridError, match=message):
        plan_runs(grid, [0], tmp_path / "out")


def _fake_run(spec, init: float, vals: list[float], wall: float) -> None:
    """metrics.jsonl of a run with 2 value-pretraining steps and evaluations at PPO steps 2, 4, 6."""
    rows = [{"step": 0, "phase": "init", "val_accuracy": init},
            {"step": 1, "phase": "value_pretrain", "ev_mc": 0.1, "explained_variance": 0.9},
            {"step": 2, "phase": "value_pretrain", "ev_mc": init, "explained_variance": 0.9}]
    for ppo in range(1, 7):
        rows.append({"step": 2 + ppo, "phase": "ppo", "ev_mc": 0.01 * ppo if ppo > 1 else float("nan"),
                     "explained_variance": 0.9, **({"val_accuracy": vals[ppo // 2 - 1]} if ppo % 2 == 0 else {}),
                     **({"ev_oracle": 0.1 * ppo, "probe_requests": 10} if ppo in (3, 6) else {}),
                     **({"mc_requests": 100} if ppo == 1 else {})})
    spec.run_dir.mkdir(parents=True)
    (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (spec.run_dir / DONE).write_text(json.dumps({"wall_s": wall, "config_hash": config_hash(spec)}))


def test_report_numbers_match_a_hand_computation(tmp_path):
    """Failure: final / best / steps-to-threshold / initial / wall or their mean and std over seeds are computed
    wrong, PPO steps count value-pretraining steps, or an unfinished run is counted."""
    grid = load_grid(_grid(tmp_path, {"vapo": {"paper": 60}, "ppo": {"paper": 5, "group": "method"}},
                           task="A toy model on a toy task"))
    out = tmp_path / "out"
    specs = plan_runs(grid, [0, 1, 2], out)
    write_manifest(out, grid.base, specs, "python tools/run_ablation.py test", task=grid.task)
    runs = {("vapo", 0): (0.1, [0.15, 0.30, 0.25], 60.0), ("vapo", 1): (0.1, [0.20, 0.20, 0.40], 120.0),
            ("vapo", 2): (0.2, [0.20, 0.25, 0.28], 180.0), ("ppo", 0): (0.1, [0.1, 0.1, 0.1], 60.0)}
    for spec in specs:
        if (spec.variant.name, spec.seed) in runs:
            _fake_run(spec, *runs[(spec.variant.name, spec.seed)])
    results = collect(out, read_manifest(out))
    row = summary_row(results["vapo"], None, 0.1)
    finals = [0.25, 0.40, 0.28]
    assert row["final"] == f"{statistics.fmean(finals):.3f} ± {statistics.stdev(finals):.3f}"
    assert row["best"] == f"{statistics.fmean([0.30, 0.40, 0.28]):.3f} ± {statistics.stdev([0.30, 0.40, 0.28]):.3f}"
    # thresholds 0.2, 0.2, 0.3: seed 0 reaches at PPO step 4, seed 1 at step 2, seed 2 never
    assert row["steps"] == f"3.0 ± {statistics.stdev([4, 2]):.1f} (1 not reached)"
    assert row["initial"] == f"{statistics.fmean([0.1, 0.1, 0.2]):.3f} ± {statistics.stdev([0.1, 0.1, 0.2]):.3f}"
    assert row["wall"] == "2.0 ± 1.0" and row["runs"] == "3/3" and row["per_seed"] == "0: 0.250, 1: 0.400, 2: 0.280"
    # ev_mc, not the variant's own-target explained_variance: last pretraining row / mean of the last 5 PPO rows
    assert row["ev_mc"] == f"{statistics.fmean([0.1, 0.1, 0.2]):.3f} ± {statistics.stdev([0.1, 0.1, 0.2]):.3f}" \
        " / 0.040 ± 0.000"
    # the area under the curve (mean of the PPO evaluations), ev_mc / ev_oracle over the PPO steps, extra samples
    aucs = [statistics.fmean(v) for v in ([0.15, 0.30, 0.25], [0.20, 0.20, 0.40], [0.20, 0.25, 0.28])]
    assert row["auc"] == f"{statistics.fmean(aucs):.3f} ± {statistics.stdev(aucs):.3f}"
    assert row["ev_mc_ppo"] == f"{statistics.fmean([0.02, 0.03, 0.04, 0.05, 0.06]):.3f} ± 0.000"
    assert row["ev_oracle"] == f"{statistics.fmean([0.3, 0.6]):.3f} ± 0.000"
    assert summary_row(results["vapo"], None, 0.1, samples_per_step=32)["extra"] == "64 ± 0 + 120 ± 0"
    assert summary_row(results["vapo"], 0.26, 0.1)["steps"] == f"5.3 ± {statistics.stdev([4, 6, 6]):.1f}"  # absolute
    ppo = summary_row(results["ppo"], None, 0.1)
    assert ppo["runs"] == "1/3" and ppo["final"] == "0.100" and ppo["steps"] == "— (1 not reached)"
    md, png = write_report(out, tmp_path / "docs" / "ablation.md")
    text = md.read_text()
    assert f"| vapo | 60 | {row['final']} | {row['auc']} |" in text and "| ppo | 5 | 0.100 |" in text
    text = write_report(out, tmp_path / "docs" / "auc.md", first="auc")[0].read_text()
    assert f"| vapo | 60 | {row['auc']} | {row['final']} |" in text and "| AUC val acc | final val acc |" in text
    assert png.stat().st_size > 0 and "python tools/run_ablation.py test" in text
    assert "**What is compared.** A toy model on a toy task, not Qwen2.5-32B" in text  # the grid file's task


def test_manifest_accumulates_a_grid_run_in_parts(tmp_path):
    """Failure: a second `--only` call forgets the first call's rows (so --report-only reports only the last
    call's variants), a variant's seeds are the grid's instead of its own, or a call with another base config
    is mixed into the same report."""
    path = _grid(tmp_path, {"vapo": {"paper": 60}, "ppo": {"paper": 5, "group": "method"}})
    out = tmp_path / "out"
    first = plan_runs(load_grid(path, only=["vapo", "ppo"]), [0, 1, 2, 3, 4], out)
    write_manifest(out, load_grid(path).base, first, "call 1")
    second = plan_runs(load_grid(path, only=["vapo"]), [5], out)
    manifest = write_manifest(out, load_grid(path).base, second, "call 2")
    assert [(v["name"], v["seeds"]) for v in manifest["variants"]] == [("vapo", [0, 1, 2, 3, 4, 5]),
                                                                       ("ppo", [0, 1, 2, 3, 4])]
    assert manifest["commands"] == ["call 1", "call 2"] and read_manifest(out) == manifest
    for spec in first:
        _fake_run(spec, 0.1, [0.2, 0.3, 0.4], 60.0)
    results = collect(out, manifest)
    assert sorted(results["ppo"]) == [0, 1, 2, 3, 4] and results["vapo"][5] is None  # vapo seed 5 not run yet
    text = write_report(out, tmp_path / "docs" / "parts.md")[0].read_text()
    assert "| vapo | 60 |" in text and "| ppo | 5 |" in text and "`call 1`, `call 2`" in text
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "train": {**BASE.get("train", {}), "seed": 9}}))
    with pytest.raises(GridError, match="another base config text"):
        write_manifest(out, load_grid(path).base, second, "call 3")


def _fake_trainer(monkeypatch, code: str) -> None:
    monkeypatch.setattr(runner, "train_command", lambda base, spec: [sys.executable, "-c", code, str(spec.run_dir)])


def test_finished_runs_are_skipped_and_failures_reported(tmp_path, monkeypatch):
    """Failure: a finished run is run again, an interrupted one is not restarted from a clean directory, a failure
    stops the grid or loses its log, or a finished run of another config is silently reused."""
    grid = load_grid(_grid(tmp_path, {"vapo": None, "other": {"overrides": ["algorithm.eps_high=0.3"]}}))
    out = tmp_path / "out"
    specs = plan_runs(grid, [0, 1], out)
    by = {(s.variant.name, s.seed): s for s in specs}
    vapo0, vapo1 = by["vapo", 0], by["vapo", 1]
    _fake_run(vapo0, 0.1, [0.1, 0.2, 0.3], 5.0)  # vapo seed 0: finished earlier
    vapo1.run_dir.mkdir(parents=True)
    (vapo1.run_dir / "metrics.jsonl").write_text("interrupted\n")  # vapo seed 1: interrupted
    _fake_trainer(monkeypatch, "import sys, pathlib; d = pathlib.Path(sys.argv[1]); "
                               "assert not (d / 'metrics.jsonl').exists(); sys.exit(3 if 'other' in str(d) else 0)")
    result = run_grid(grid.base, specs, jobs=2, log=lambda _: None, poll_s=0.05)
    assert result.skipped == [vapo0] and result.done == [vapo1]
    assert sorted((s.variant.name, s.seed, code) for s, code, _ in result.failed) == [("other", 0, 3), ("other", 1, 3)]
    assert all(log.is_file() for _, _, log in result.failed) and (vapo1.run_dir / DONE).is_file()
    _fake_trainer(monkeypatch, "raise SystemExit('must not run')")
    again = run_grid(grid.base, [vapo0, vapo1], jobs=1, log=lambda _: None, poll_s=0.05)
    assert again.skipped == [vapo0, vapo1] and not again.done and not again.failed
    changed = plan_runs(grid, [0], out, ["train.steps=5"])
    with pytest.raises(StaleRunError, match="finished with another config"):
        run_grid(grid.base, changed, log=lambda _: None)


def test_interrupted_run_with_a_checkpoint_resumes(tmp_path, monkeypatch):
    """Failure: a run interrupted after a checkpoint starts over (its work lost), or one whose saved config differs
    from the grid's is resumed instead of cleared."""
    from vapo_megatron.config import dump_yaml
    from vapo_megatron.engine.checkpoint import DONE_FILE, checkpoint_name, checkpoints_root

    grid = load_grid(_grid(tmp_path, {"vapo": None}))
    same, changed = plan_runs(grid, [0, 1], tmp_path / "out")
    for spec, cfg_text in ((same, dump_yaml(same.cfg)), (changed, "other: config\n")):
        ckpt = checkpoints_root(spec.run_dir) / checkpoint_name(10)
        ckpt.mkdir(parents=True)
        (ckpt / DONE_FILE).write_text("{}")
        (spec.run_dir / "config.yaml").write_text(cfg_text)
        (spec.run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    _fake_trainer(monkeypatch, "import sys, pathlib; d = pathlib.Path(sys.argv[1]); "
                               "(d / 'argv').write_text(' '.join(sys.argv[2:])); "
                               "(d / 'had_metrics').write_text(str((d / 'metrics.jsonl').exists()))")
    result = run_grid(grid.base, [same, changed], jobs=1, log=lambda _: None, poll_s=0.05)
    assert result.done == [same, changed]
    assert (same.run_dir / "argv").read_text() == "--resume" and (same.run_dir / "had_metrics").read_text() == "True"
    assert (changed.run_dir / "argv").read_text() == "" and (changed.run_dir / "had_metrics").read_text() == "False"


def test_pause_and_continue_signal_the_runner_and_its_runs(tmp_path):
    """Failure: --pause leaves the runner's child processes (the training runs) running, or --continue does not
    wake them."""
    import subprocess
    import time

    import psutil

    from vapo_megatron.ablation.cli import PID_FILE, main

    runner_code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; "
                   "time.sleep(60)'], start_new_session=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", runner_code])
    try:
        (tmp_path / PID_FILE).write_text(str(proc.pid))
        deadline = time.time() + 20
        while not psutil.Process(proc.pid).children() and time.time() < deadline:
            time.sleep(0.05)
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        assert len(procs) == 2
        assert main(["--out", str(tmp_path), "--pause"]) == 0
        assert _wait_for(lambda: all(p.status() == psutil.STATUS_STOPPED for p in procs)), [p.status() for p in procs]
        assert main(["--out", str(tmp_path), "--continue"]) == 0
        assert _wait_for(lambda: all(p.status() != psutil.STATUS_STOPPED for p in procs))
    finally:
        for p in psutil.Process(proc.pid).children(recursive=True):
            p.kill()
        proc.kill()
    assert main(["--out", str(tmp_path / "none"), "--pause"]) == 2


def _wait_for(condition, seconds: float = 30.0) -> bool:
    import time

    deadline = time.time() + seconds
    while not condition():
        if time.time() > deadline:
            return False
        time.sleep(0.02)
    return True
