"""The ablation smoke grid end to end (examples/ablation/smoke.yaml: VAPO, PPO, DAPO x 1 seed x 2 PPO steps) with
the real trainer in subprocesses, on a fresh tiny model and synthetic task written to a temporary folder. About
1.5-2 minutes on 2 cores. A failure pinpoints the runner's plumbing (commands, ports, markers) or the report,
not the algorithms."""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from vapo_megatron.ablation.cli import main
from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import save_tiny_hf_model

REPO = Path(__file__).resolve().parents[2]


def test_smoke_grid_runs_and_reports(tmp_path, monkeypatch, capsys):
    save_tiny_hf_model(tmp_path / "model", "qwen2", seed=0)
    write_synthetic_task(tmp_path / "data", num_train=64, num_val=8, num_demonstrations=8, seed=0,
                         difficulty=SyntheticDifficulty(min_steps=1, max_steps=2))
    monkeypatch.chdir(REPO)  # the grid names its base config relative to the repository
    out, report = tmp_path / "runs", tmp_path / "docs" / "ablation.md"
    args = ["--grid", "examples/ablation/smoke.yaml", "--seeds", "0", "--jobs", "2", "--out", str(out),
            "--report", str(report), "--set", f"model.hf_dir={tmp_path / 'model'}",
            f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]",
            f"data.val_files=[{tmp_path / 'data' / 'val.jsonl'}]"]
    t0 = time.time()
    assert main(args) == 0, capsys.readouterr()
    first = time.time() - t0
    text = report.read_text()
    for name in ("vapo", "ppo", "dapo"):
        assert f"| {name} |" in text and (out / name / "seed0" / "DONE").is_file()
    assert text.count("| 1/1 |") == 3, text
    assert report.with_suffix(".png").stat().st_size > 0
    configs = {n: yaml.safe_load((out / n / "seed0" / "config.yaml").read_text()) for n in ("vapo", "ppo", "dapo")}
    samples = {n: c["rollout"]["num_prompts"] * c["rollout"]["n"] for n, c in configs.items()}
    assert samples == {"vapo": 16, "ppo": 16, "dapo": 16} and configs["ppo"]["rollout"]["n"] == 1
    assert {c["train"]["steps"] for c in configs.values()} == {2}
    t0 = time.time()
    assert main(args) == 0  # every run is finished: skipped, the report is rebuilt
    assert "3 runs: 3 already finished, 0 to run" in capsys.readouterr().out and time.time() - t0 < first / 2
