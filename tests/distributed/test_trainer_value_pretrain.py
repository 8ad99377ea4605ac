"""The whole loop's issue-17 mechanics on 1 gloo rank: value pretraining stops at the ev_mc threshold (not at
its cap) and PPO still runs train.steps steps after it, the reason is logged, ev_mc is in every row, critic
passes are separate from actor epochs, a reward's first_error_span becomes credit metrics, the credit picture is
written at validation steps, and a resume after the early stop continues with PPO. A failure pinpoints the
trainer's loop bookkeeping (trainer.py run/update) rather than the maths (tests/unit)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest

from vapo_megatron.testing.assets import tiny_task_assets
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed

REWARD = '''
def reward(response, ground_truth, **kwargs):
    """Half the random responses right (digit-count parity); a wrong one blames its first 3 characters."""
    score = float(sum(c.isdigit() for c in response) % 2)
    return score if score or len(response) < 3 else {"score": score, "first_error_span": [0, 3]}
'''


def _run_body(overrides: list[str], resume: bool):
    from vapo_megatron.config import load_config
    from vapo_megatron.train.loop import Trainer

    return Trainer(load_config(None, overrides), resume=resume).run()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tiny_task_assets(tmp_path_factory.mktemp("assets"), num_val=4)
    (root / "reward.py").write_text(REWARD)
    return root


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_ev_threshold_stops_value_pretraining_and_resume_continues(assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2",
        "rollout.max_prompt_length=64", "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
        "train.steps=2", "train.mini_batch_size=4", "train.micro_batch_size=4", "train.critic_epochs=2",
        "algorithm.value_pretrain_steps=3", "algorithm.value_pretrain_ev_threshold=-1000",
        "actor_optim.lr=1e-3", "critic_optim.lr=1e-3", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"data.val_files=[{assets / 'data' / 'val.jsonl'}]", "eval.every=1", "eval.n=1",
        f"reward.name={assets / 'reward.py'}:reward", f"checkpoint.run_dir={run_dir}", "checkpoint.save_every=1",
        "checkpoint.keep_last=5", "checkpoint.export_hf_at_end=false", "logging.progress_bar=false",
        "logging.tensorboard=false",
    ]
    full = run_distributed(_run_body, 1, overrides, False, timeout=600)[0]
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["init", "value_pretrain", "ppo", "ppo"], \
        "value pretraining did not stop at the ev_mc threshold, or PPO did not run train.steps steps after it"
    assert rows[1]["value_pretrain_stop"] == "ev_threshold" and math.isfinite(rows[1]["ev_mc"])
    assert all("ev_mc" in r and "explained_variance" in r for r in rows[1:])
    assert rows[1]["critic/optimizer_steps"] == 4 and rows[1]["policy/optimizer_steps"] == 0, "2 critic passes x 2"
    assert rows[2]["critic/optimizer_steps"] == 4 and rows[2]["policy/optimizer_steps"] == 2, "1 actor pass x 2"
    assert any("credit_first_error_adv" in r and "credit_rest_wrong_adv" in r for r in rows[1:])
    for step in (2, 3):
        assert (run_dir / "credit" / f"step_{step:04d}.png").stat().st_size > 0
        assert (run_dir / "credit" / f"step_{step:04d}.html").stat().st_size > 0

    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    resumed = run_distributed(_run_body, 1, overrides, True, timeout=600)[0]
    assert [r["phase"] for r in _rows(run_dir)] == ["init", "value_pretrain", "ppo", "ppo"]
    assert resumed["step"] == full["step"] == 3 and resumed["phase"] == "ppo"
    for key in ("policy/pg_loss", "critic/value_loss", "ev_mc", "reward_mean"):
        a, b = full[key], resumed[key]
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-6 * max(1.0, abs(a)), (key, a, b)


def _small_run(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of a small run (4 prompts x 2, 16 tokens, 1 value-pretraining step, 2 PPO steps), then `extra`
    (a later key wins)."""
    return [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2",
        "rollout.max_prompt_length=64", "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
        "train.steps=2", "train.mini_batch_size=8", "train.micro_batch_size=4", "algorithm.value_pretrain_steps=1",
        "actor_optim.lr=1e-4", "critic_optim.lr=1e-4", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"reward.name={assets / 'reward.py'}:reward", f"checkpoint.run_dir={run_dir}",
        "checkpoint.export_hf_at_end=false", "logging.progress_bar=false", "logging.tensorboard=false", *extra,
    ]


def _unready_body(overrides: list[str], resume: bool = False):
    from vapo_megatron.errors import CriticNotReadyError

    try:
        return "finished", _run_body(overrides, resume)
    except CriticNotReadyError as e:
        import torch.distributed as dist

        dist.destroy_process_group()
        return "stopped", str(e)


def test_critic_not_ready_stops_saved_then_pretrains_on_or_lengthens(assets, tmp_path):
    """Value pretraining that ends at its cap below the ev_mc threshold (unreachable here). By default
    (algorithm.critic_unready=stop) the run writes the step's row and a checkpoint, then stops with
    CriticNotReadyError naming the cap, the threshold and both ways on; --resume with a larger cap pretrains on
    up to it (and stops again); --resume with critic_unready=lengthen trains PPO at lambda_policy = 1 and logs
    critic_ready = 0."""
    run_dir = tmp_path / "run"
    overrides = _small_run(assets, run_dir, "algorithm.value_pretrain_ev_threshold=1000", "algorithm.alpha=0.05")
    outcome, message = run_distributed(_unready_body, 1, overrides, timeout=600)[0]
    assert outcome == "stopped" and "cap at step 1" in message and "threshold 1000" in message, message
    assert "--resume" in message and "critic_unready=lengthen" in message, message
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["value_pretrain"] and rows[0]["critic_ready"] == 0.0
    assert rows[0]["value_pretrain_stop"] == "step_cap"
    assert (run_dir / "checkpoints" / "step_00000001" / "DONE").exists(), "the pretrained critic was not saved"

    outcome, message = run_distributed(_unready_body, 1, [*overrides, "algorithm.value_pretrain_steps=2"], True,
                                       timeout=600)[0]
    assert outcome == "stopped" and "cap at step 2" in message, message
    assert [r["phase"] for r in _rows(run_dir)] == ["value_pretrain"] * 2

    outcome, _ = run_distributed(_unready_body, 1, [*overrides, "algorithm.value_pretrain_steps=2",
                                                    "algorithm.critic_unready=lengthen"], True, timeout=600)[0]
    rows = _rows(run_dir)
    assert outcome == "finished" and [r["phase"] for r in rows] == ["value_pretrain"] * 2 + ["ppo"] * 2
    assert all(r["lam_policy_mean"] == 1.0 and r["critic_ready"] == 0.0 for r in rows[2:]), rows[2:]


def test_critic_fits_monte_carlo_values_in_pretraining_and_ppo(assets, tmp_path):
    """algorithm.mc_critic_weight=1: Monte-Carlo values of every boundary are estimated at every step, value
    pretraining included (mc_requests = K x boundaries x rows), and their own ev_mc is logged beside the critic's
    (the blend of the critic's targets itself: tests/unit/test_mc_critic_targets.py)."""
    run_dir = tmp_path / "run"
    overrides = _small_run(assets, run_dir, "train.steps=1", "algorithm.mc_critic_weight=1.0", "mc.k=2",
                           "mc.step_delimiter=null", "mc.step_tokens=4")
    run_distributed(_run_body, 1, overrides, False, timeout=600)
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["value_pretrain", "ppo"]
    for r in rows:
        assert r["mc_requests"] == 2 * 8 * r["mc_boundaries"] and r["mc_tokens"] > 0, r
        assert "mc_ev_mc" in r and math.isfinite(r["critic/value_loss"])


@pytest.mark.slow
def test_ev_horizon_lengthens_lambda_for_a_critic_that_explains_nothing(assets, tmp_path):
    """algorithm.ev_horizon with a threshold no critic reaches: every PPO step's lambda_policy is
    1 - (1 - base) * clip(ev_mc / threshold, 0, 1), here >= 0.999, where the length-adaptive lambda of these
    16-token responses is 0 (alpha * L <= 1); value pretraining is unchanged (lambda 1 targets, no policy step)."""
    run_dir = tmp_path / "run"
    overrides = _small_run(assets, run_dir, "algorithm.ev_horizon=true", "algorithm.critic_unready=continue",
                           "algorithm.value_pretrain_ev_threshold=1000", "algorithm.alpha=0.05")
    run_distributed(_run_body, 1, overrides, False, timeout=600)
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["value_pretrain", "ppo", "ppo"]
    for r in rows[1:]:
        expected = 1 - min(max(r["ev_mc"] / 1000, 0.0), 1.0)  # base 0 for every response: lambda = 1 - trust
        assert r["lam_policy_mean"] == pytest.approx(expected, abs=1e-6) and r["lam_policy_mean"] >= 0.999, r
    run_distributed(_run_body, 1, _small_run(assets, tmp_path / "off", "algorithm.critic_unready=continue",
                                             "algorithm.value_pretrain_ev_threshold=1000", "algorithm.alpha=0.05"),
                    False, timeout=600)
    assert all(r["lam_policy_mean"] == 0.0 for r in _rows(tmp_path / "off")[1:]), "without it: the paper's horizon"


@pytest.mark.slow
def test_critic_larger_than_the_policy(assets, tmp_path):
    """model.critic_hf_dir of another size (issue 25 item 2): a critic twice as wide as the policy (6 layers
    against 4), with the same tokenizer, is built at its own shape, pretrains and trains through PPO, and the run
    resumes from its checkpoint. A failure pinpoints train/build.py critic_architecture or a place that builds the
    critic at the policy's shape (before: a ShapeMismatchError on model.embed_tokens.weight)."""
    from vapo_megatron.models.tiny import save_tiny_hf_model

    big = tmp_path / "critic"
    save_tiny_hf_model(big, "qwen2", seed=1, hidden_size=256, num_layers=6, num_heads=8, num_kv_heads=4,
                       intermediate_size=512)
    run_dir = tmp_path / "run"
    overrides = _small_run(assets, run_dir, f"model.critic_hf_dir={big}", "checkpoint.save_every=1")
    full = run_distributed(_run_body, 1, overrides, False, timeout=600)[0]
    rows = _rows(run_dir)
    assert [r["phase"] for r in rows] == ["value_pretrain", "ppo", "ppo"]
    assert all(math.isfinite(r["critic/value_loss"]) and math.isfinite(r["value_mean"]) for r in rows)
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    resumed = run_distributed(_run_body, 1, overrides, True, timeout=600)[0]
    for key in ("critic/value_loss", "value_mean", "policy/pg_loss"):
        assert abs(full[key] - resumed[key]) <= 1e-6 * max(1.0, abs(full[key])), (key, full[key], resumed[key])
