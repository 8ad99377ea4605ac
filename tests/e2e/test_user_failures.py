"""The real `vapo-train` CLI as a new user meets it, on a model family (tiny Llama) and a task (copying a word,
verl-format rows) the other tests do not use: a verl-signature reward scores with 0 errors, a raising reward
stops the run with its message, a finished run directory is not reused silently, and no process outlives a
killed trainer. A failure pinpoints the CLI's error handling, preflight.py, the reward failure check or
process_guard.py."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VERL_REWARD = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    assert data_source == "copy_task" and isinstance(extra_info, dict), (data_source, extra_info)
    return 1.0 if ground_truth in solution_str else 0.0
'''
RAISING_REWARD = '''
def score(response, ground_truth):
    raise RuntimeError("the user's reward is broken: marker 7f3a")
'''
WORDS = ["apple", "river", "stone", "cloud", "grape", "tiger", "lemon", "piano"]


@pytest.fixture(scope="module")
def assets(tmp_path_factory) -> Path:
    from vapo_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("unseen")
    save_tiny_hf_model(root / "model", "llama", seed=1)
    rows = [{"prompt": [{"role": "user", "content": f"Copy the word: {w}"}], "data_source": "copy_task",
             "reward_model": {"ground_truth": w, "style": "rule"}, "extra_info": {"index": i}}
            for i, w in enumerate(WORDS)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "verl_reward.py").write_text(VERL_REWARD)
    (root / "raising_reward.py").write_text(RAISING_REWARD)
    return root


def _command(assets: Path, run_dir: Path, reward: str, *extra: str, steps: int = 1) -> list[str]:
    return [sys.executable, "-m", "vapo_megatron.cli", "--config", os.devnull, f"model.hf_dir={assets / 'model'}",
            "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2", "rollout.max_prompt_length=64",
            "rollout.max_response_length=8", "rollout.cpu_kv_cache_bytes=67108864", f"train.steps={steps}",
            "train.mini_batch_size=8", "train.micro_batch_size=8", "algorithm.value_pretrain_steps=0",
            f"data.train_files=[{assets / 'train.jsonl'}]", f"reward.name={reward}", f"checkpoint.run_dir={run_dir}",
            "checkpoint.save_every=1", "checkpoint.export_hf_at_end=false", "logging.progress_bar=false",
            "logging.tensorboard=false", *extra]


def _run(cmd: list[str], timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`cmd` in the repository with the worktree's package, no debug mode, and `env`'s variables on top."""
    base = {k: v for k, v in os.environ.items() if k not in ("VAPO_DEBUG", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    env = {**base, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_raising_reward_stops_the_run_with_its_message(assets, tmp_path):
    """Issue 13: a reward raising on every call trained to the end with exit 0 and never showed the error."""
    start = time.monotonic()
    res = _run(_command(assets, tmp_path / "run", f"{assets / 'raising_reward.py'}:score", steps=5))
    elapsed = time.monotonic() - start
    out = res.stdout + res.stderr
    assert res.returncode != 0, out[-3000:]
    assert "the user's reward is broken: marker 7f3a" in out
    assert "error: the reward function failed on 8 of 8 responses" in res.stderr, res.stderr[-3000:]
    assert "raising_reward.py:score" in res.stderr
    assert elapsed < 240, f"took {elapsed:.0f} s"
    metrics = tmp_path / "run" / "metrics.jsonl"
    assert not metrics.exists() or metrics.read_text() == "", "a step was trained on failure scores"


@pytest.mark.slow
def test_verl_reward_on_unseen_task_and_run_dir_rules(assets, tmp_path):
    """A verl-signature reward scores with 0 errors; running the finished run again without --resume is refused
    (nothing overwritten); --resume names the checkpoint and continues; a torn metrics line is repaired."""
    run_dir, reward = tmp_path / "run", f"{assets / 'verl_reward.py'}:compute_score"
    first = _run(_command(assets, run_dir, reward))
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["reward_errors"] == 0 and rows[-1]["reward_timeouts"] == 0

    again = _run(_command(assets, run_dir, reward))
    assert again.returncode == 1 and "already holds checkpoints" in again.stderr and "--resume" in again.stderr
    assert "Traceback" not in again.stderr
    assert [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == rows

    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "pha')  # killed while writing
    resumed = _run(_command(assets, run_dir, reward, "--resume", steps=2))
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, out[-3000:]
    assert "resumed from" in out and "step_00000001 (step 1); continuing at step 2" in out
    assert "dropped a torn last line" in out and "metrics.jsonl" in out
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


@pytest.mark.slow
def test_no_process_outlives_a_killed_trainer(assets, tmp_path):
    """Issue 13: after kill -9 the resource tracker and megatron's Manager process stayed alive."""
    import psutil

    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = _command(assets, run_dir, f"{assets / 'verl_reward.py'}:compute_score", "reward.num_workers=2",
                   steps=50)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not list((run_dir / "checkpoints").glob("step_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the trainer stopped early"
            time.sleep(1)
        time.sleep(2)
        children = _descendants(proc.pid)
        assert children, "the trainer has no child processes: the test would prove nothing"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    _, alive = psutil.wait_procs(children, timeout=20)
    assert not alive, [(p.pid, p.name(), p.cmdline()[:4]) for p in alive]


def test_absurd_lr_is_stopped_before_the_destroyed_weights_are_saved(assets, tmp_path):
    """Issue 13: with an absurd lr the first (finite) update destroyed the weights and was checkpointed; the
    non-finite guard stopped the run only steps later. Now that first update is never synced or saved."""
    run_dir = tmp_path / "run"
    res = _run(_command(assets, run_dir, f"{assets / 'verl_reward.py'}:compute_score", "actor_optim.lr=1000",
                        "critic_optim.lr=1000", steps=3))
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    assert "step 1 diverged" in res.stderr and "train.max_weight_norm_ratio" in res.stderr, res.stderr[-3000:]
    assert not list((run_dir / "checkpoints").glob("step_*")), "the diverged state was checkpointed"


@pytest.mark.parametrize("case", ["missing", "no_weights"])
def test_model_dir_problems_get_one_error_line_before_any_model_is_built(assets, tmp_path, case):
    """Issue 23: a missing model directory, or one without weights, gave a traceback (without weights only
    after the models were built)."""
    model = tmp_path / "model"
    if case == "no_weights":
        shutil.copytree(assets / "model", model)
        (model / "model.safetensors").unlink()
    cmd = [c if not c.startswith("model.hf_dir=") else f"model.hf_dir={model}"
           for c in _command(assets, tmp_path / "run", f"{assets / 'verl_reward.py'}:compute_score")]
    start = time.monotonic()
    res = _run(cmd)
    assert res.returncode == 1, (res.stdout + res.stderr)[-3000:]
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert f"model.hf_dir={str(model)!r}" in errors[0], errors[0]
    assert ("does not exist" if case == "missing" else "has no weights") in errors[0], errors[0]
    assert time.monotonic() - start < 30, "the check came after building the models"


def _small_file_limit(limit: int):
    """The child's files cannot grow past `limit` bytes (EFBIG "File too large", as a full disk gives ENOSPC)."""
    def apply():
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


def test_failed_checkpoint_write_gets_one_error_line(assets, tmp_path):
    """Issue 23: a disk that fills during a save stopped the run with megatron's raw "RuntimeError: Worker
    failure ..." traceback. The checkpoint files of the tiny model are about 7.5 MB, nothing else the run
    writes is, so with files capped at 6 MB the first save fails in megatron's writer."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("VAPO_DEBUG", None)
    cmd = _command(assets, tmp_path / "run", f"{assets / 'verl_reward.py'}:compute_score")
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                         preexec_fn=_small_file_limit(6 << 20))
    errors = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    assert res.returncode == 1 and len(errors) == 1, (res.stdout + res.stderr)[-3000:]
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "saving the checkpoint of step 1 failed" in errors[0] and "free space there" in errors[0], errors[0]
    assert "no complete checkpoint of this run yet" in errors[0], errors[0]
