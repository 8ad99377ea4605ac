"""Issue 23: checkpoints a run can trust, through the real `vapo-train --resume` of a new user. One short run saves
steps 1 and 2; each probe damages a copy of it the way the fault probes did and resumes:

* a legacy megatron ``policy/common.pt`` planted in the newest checkpoint (its pickle writes a marker file), with
  and without ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``: refused with one ``error:`` line, the marker never appears;
* 4 KiB of random bytes inside ``policy/__0_0.distcp`` (size unchanged): refused naming the file, with the offer of
  the previous checkpoint, which ``--resume=previous`` then uses (and says so);
* a ``.distcp`` cut to half and a truncated ``.metadata``: one ``error:`` line naming the file, no advice to trust
  the checkpoint;
* new optimizer hyper-parameters on resume (lr, weight decay, betas, clip, warmup): the run continues with them
  and prints each change (megatron-core matched param groups by their values and refused any change).

A failure pinpoints engine/manifest.py (checksums), engine/checkpoint.py (choosing the checkpoint),
convert/safe_load.py (pickles) or the CLI's error handling."""
from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from tests.e2e.test_user_failures import _command, _run, assets  # noqa: F401 - assets is a fixture

REWARD = "verl_reward.py:compute_score"


class _Planted:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory) -> Path:  # noqa: F811
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    res = _run(_command(assets, run_dir, f"{assets / REWARD}", "checkpoint.keep_last=3", steps=2))
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert names == ["step_00000001", "step_00000002"], names
    return run_dir


def _copy(trained: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    return run_dir


def _resume(assets, run_dir: Path, flag: str = "--resume", *overrides: str, env: dict | None = None):  # noqa: F811
    cmd = _command(assets, run_dir, f"{assets / REWARD}", "checkpoint.keep_last=3", *overrides, flag, steps=3)
    return _run(cmd, env=env)


def _one_error_line(res) -> str:
    lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    assert len(lines) == 1, res.stderr[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("force_no_weights_only", [True, False])
def test_planted_common_pt_never_runs(assets, trained, tmp_path, force_no_weights_only):  # noqa: F811
    run_dir = _copy(trained, tmp_path)
    marker = tmp_path / "pwned"
    (run_dir / "checkpoints" / "step_00000002" / "policy" / "common.pt").write_bytes(
        pickle.dumps({"args": _Planted(marker)}))
    env = {"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"} if force_no_weights_only else {}
    res = _resume(assets, run_dir, env=env)
    assert not marker.exists(), "a planted pickle ran on --resume"
    line = _one_error_line(res)
    assert "policy/common.pt" in line and "step_00000002" in line, line
    assert "trust_checkpoints" not in line, line


def _damage_distcp(run_dir: Path) -> Path:
    path = run_dir / "checkpoints" / "step_00000002" / "policy" / "__0_0.distcp"
    size = path.stat().st_size
    with open(path, "r+b") as f:  # inside the tensor data, away from the file's ends
        f.seek(size // 2)
        f.write(os.urandom(4096))
    assert path.stat().st_size == size
    return path


@pytest.mark.slow
def test_overwritten_bytes_are_refused_and_previous_is_offered_then_used(assets, trained, tmp_path):  # noqa: F811
    run_dir = _copy(trained, tmp_path)
    _damage_distcp(run_dir)
    line = _one_error_line(_resume(assets, run_dir))
    assert "policy/__0_0.distcp" in line and "step_00000002" in line and "checksum" in line, line
    assert "step_00000001" in line and "--resume=previous" in line, line

    res = _resume(assets, run_dir, "--resume=previous")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "skipping" in out and "step_00000002" in out, out[-3000:]
    assert "step_00000001 (step 1); continuing at step 2" in out, out[-3000:]


@pytest.mark.parametrize("name", ["policy/__0_0.distcp", "policy/.metadata"])
def test_truncated_file_gets_one_error_line(assets, trained, tmp_path, name):  # noqa: F811
    run_dir = _copy(trained, tmp_path)
    path = run_dir / "checkpoints" / "step_00000002" / name
    os.truncate(path, path.stat().st_size // 2)
    line = _one_error_line(_resume(assets, run_dir))
    assert name in line and "step_00000002" in line, line
    assert "trust_checkpoints" not in line, line
    assert "step_00000001" in line and "--resume=previous" in line, line


def test_resume_with_new_hyperparameters(assets, trained, tmp_path):  # noqa: F811
    run_dir = _copy(trained, tmp_path)
    res = _resume(assets, run_dir, "--resume", "actor_optim.lr=1e-4", "actor_optim.weight_decay=0.0",
                  "actor_optim.adam_beta2=0.99", "critic_optim.clip_grad=0.5", "critic_optim.warmup_steps=3")
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "step_00000002 (step 2); continuing at step 3" in out, out[-3000:]
    for change in ("policy optimizer: lr 1e-06 -> 0.0001", "weight_decay 0.1 -> 0.0", "adam_beta2 0.999 -> 0.99",
                   "critic optimizer: clip_grad 1.0 -> 0.5", "warmup_steps 0 -> 3"):
        assert change in out, (change, out[-3000:])
