"""A short VAPO run (1 value-pretraining step + 2 PPO steps) on 4 gloo ranks with the policy at TP=2 x PP=2 +
SP and the critic at TP=2 (DP=2): separate layouts, the whole loop (vLLM rollouts, rewards, critic values,
old log-probs, GAE, updates, weight sync) and its metrics, with packed token-budget micro-batches (the default
packing; padding waste about 0). A failure pinpoints the trainer's plumbing."""
from __future__ import annotations

import json
import math

import pytest

from vapo_megatron.testing.assets import tiny_task_assets
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed

REQUIRED = ("step", "phase", "reward_mean", "accuracy", "response_length_mean", "response_clip_ratio",
            "critic/value_loss", "explained_variance", "policy/pg_loss", "policy/nll_loss", "policy/clip_frac_low",
            "policy/clip_frac_high", "policy/entropy", "policy/approx_kl", "policy/grad_norm", "critic/grad_norm",
            "rollout_logprob_diff",
            "lam_policy_mean", "t_generation", "t_reward", "t_critic_forward", "t_old_logprob", "t_actor_update",
            "t_critic_update", "t_weight_sync", "t_other")


def _train_body(overrides: list[str]):
    import torch.distributed as dist

    from vapo_megatron.config import load_config, validate
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.train.loop import Trainer

    cfg = load_config(None, overrides)
    validate(cfg, dist.get_world_size(), load_arch(cfg.model.hf_dir))
    return Trainer(cfg).run()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tiny_task_assets(tmp_path_factory.mktemp("assets"), num_val=8)
    return root


def test_two_ppo_steps_policy_tp2_pp2_sp_critic_tp2(assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32",
        "policy_parallel.tp=2", "policy_parallel.pp=2", "policy_parallel.sequence_parallel=true",
        "critic_parallel.tp=2", "rollout.num_prompts=4", "rollout.n=2", "rollout.max_prompt_length=64",
        "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728", "train.steps=2",
        "train.mini_batch_size=8", "train.micro_batch_tokens=96", "algorithm.value_pretrain_steps=1",
        "actor_optim.lr=1e-4", "critic_optim.lr=1e-4", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        f"data.val_files=[{assets / 'data' / 'val.jsonl'}]", "eval.every=2", "eval.n=2", "reward.name=synthetic",
        f"checkpoint.run_dir={run_dir}", "logging.progress_bar=false",
        "mc.probe_every=2", "mc.probe_rows=4", "mc.probe_k=2", "mc.step_delimiter=null", "mc.step_tokens=4",
    ]
    results = run_distributed(_train_body, 4, overrides, timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["init", "value_pretrain", "ppo", "ppo"]
    # the critic probe (values/mc.py) at policy TP2 x PP2, critic TP2: every 2nd step, 4 responses x K=2
    assert "ev_oracle" in rows[2] and "ev_oracle" not in rows[1] and "ev_oracle" not in rows[3]
    assert {"ev_ceiling", "probe_ev_mc"} <= rows[2].keys() and "ev_ceiling" not in rows[3]  # beside ev_oracle
    assert rows[2]["probe_requests"] == 2 * 4 * rows[2]["probe_boundaries"] and rows[2]["probe_tokens"] > 0
    for key in REQUIRED:
        assert key in rows[-1], f"metrics.jsonl lacks {key}"
    assert "val_accuracy" in rows[-1] and "val_accuracy" in rows[0]
    assert rows[-1]["rollout_logprob_diff"] < 1e-4, "vLLM and the TP2xPP2 policy disagree: weight sync broken"
    assert rows[-1]["policy/skipped"] == 0 and rows[-1]["critic/skipped"] == 0
    # packed by default (train.pack_sequences): only the stream's alignment to tp (<= 1 token per micro-batch)
    assert rows[-1]["policy/padding_waste"] < 0.05 and rows[-1]["critic/padding_waste"] < 0.05, rows[-1]
    assert (run_dir / "curves.png").stat().st_size > 0 and (run_dir / "config.yaml").exists()
    from transformers import AutoModelForCausalLM  # the final policy exported at TP2xPP2 loads in transformers

    AutoModelForCausalLM.from_pretrained(run_dir / "hf_policy")
    assert all(r["step"] == 3 for r in results), "every rank finishes the same step"


def _run_body(overrides: list[str], resume: bool):
    from vapo_megatron.config import load_config
    from vapo_megatron.train.loop import Trainer

    return Trainer(load_config(None, overrides), resume=resume).run()


def test_resume_equals_uninterrupted_run(assets, tmp_path):
    """Run 3 steps saving after each; drop the last checkpoint and resume from step 2: step 3 must be the same
    step again (same samples, rewards, losses, gradient norms), which needs models, both optimizers, RNG,
    data position and sampling seeds restored exactly."""
    import shutil

    run_dir = tmp_path / "run"
    overrides = [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2",
        "rollout.max_prompt_length=64", "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
        "train.steps=2", "train.mini_batch_size=4", "train.micro_batch_size=2", "algorithm.value_pretrain_steps=1",
        "actor_optim.lr=1e-3", "critic_optim.lr=1e-3", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        "reward.name=synthetic", f"checkpoint.run_dir={run_dir}", "checkpoint.save_every=1",
        "checkpoint.keep_last=5", "logging.progress_bar=false", "logging.tensorboard=false",
        "mc.probe_every=1", "mc.probe_rows=4", "mc.probe_k=2",   # the probe's samples must resume exactly too
    ]
    full = run_distributed(_run_body, 1, overrides, False, timeout=600)[0]
    shutil.rmtree(run_dir / "checkpoints" / "step_00000003")
    resumed = run_distributed(_run_body, 1, overrides, True, timeout=600)[0]
    assert full["step"] == resumed["step"] == 3
    compared = [k for k, v in full.items() if isinstance(v, float) and not k.startswith("t_")]
    assert {"policy/pg_loss", "critic/value_loss", "policy/grad_norm", "reward_mean",
            "rollout_logprob_diff", "probe_tokens"} <= set(compared)
    differ = [f"{k}: {resumed[k]} vs {full[k]}" for k in compared
              if not (math.isnan(full[k]) and math.isnan(resumed[k]))
              and not abs(resumed[k] - full[k]) <= 1e-6 * max(1.0, abs(full[k]))]
    assert not differ, differ
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3], "the resumed run rewrites the rows after its checkpoint"


def test_context_parallel_run(assets, tmp_path):
    """The whole loop at cp=2 (both roles, 2 ranks, DP=1): rollouts from the synced policy, values and old
    log-probs gathered over CP, updates, checkpoint. The numbers themselves are checked against cp=1 in
    tests/distributed/test_context_parallel.py; here the plumbing: the vLLM engine agrees with the CP policy
    (weight sync and log-probs), both models update, the checkpoint records cp. Truncated importance sampling
    is on (its maths: tests/distributed/test_truncated_is_objective.py): its metrics reach metrics.jsonl, and in
    fp32 vLLM's and the trainer's probabilities agree, so the ratio is 1 and nothing is capped."""
    run_dir = tmp_path / "run"
    overrides = [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "policy_parallel.cp=2", "critic_parallel.cp=2",
        "rollout.num_prompts=4", "rollout.n=2", "rollout.max_prompt_length=64", "rollout.max_response_length=16",
        "rollout.cpu_kv_cache_bytes=134217728", "train.steps=1", "train.mini_batch_size=8",
        "train.micro_batch_size=4", "algorithm.value_pretrain_steps=1", "actor_optim.lr=1e-4",
        "critic_optim.lr=1e-4", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]", "reward.name=synthetic",
        f"checkpoint.run_dir={run_dir}", "checkpoint.save_every=1", "logging.progress_bar=false",
        "logging.tensorboard=false", "algorithm.tis_cap=2.0",
    ]
    results = run_distributed(_train_body, 2, overrides, timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["value_pretrain", "ppo"]
    last = rows[-1]
    assert last["rollout_logprob_diff"] < 1e-4, "vLLM and the CP policy disagree"
    assert abs(last["policy/tis_ratio_mean"] - 1) < 1e-3 and last["policy/tis_capped_frac"] == 0
    assert last["policy/skipped"] == 0 and last["critic/skipped"] == 0
    assert math.isfinite(last["policy/pg_loss"]) and last["policy/grad_norm"] > 0 and last["critic/grad_norm"] > 0
    meta = json.loads(next((run_dir / "checkpoints").glob("step_*/meta.json")).read_text())
    assert '"cp": 2' in json.dumps(meta), meta
    assert all(r["step"] == 2 for r in results)


def test_monte_carlo_value_source_dp2(assets, tmp_path):
    """VAPO on Monte-Carlo values instead of a critic (algorithm.value_source=mc, VinePPO's step advantages) at
    DP=2: two vLLM engines share the continuations; no critic is built; the values' cost is logged; every rank
    ends on the same step. (The estimates themselves: tests/distributed/test_mc_values.py.)"""
    run_dir = tmp_path / "run"
    overrides = [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "rollout.num_prompts=4", "rollout.n=2",
        "rollout.max_prompt_length=64", "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
        "train.steps=2", "train.mini_batch_size=8", "train.micro_batch_size=2", "algorithm.use_critic=false",
        "algorithm.value_source=mc", "algorithm.mc_advantage=step", "mc.k=2", "mc.step_delimiter=null",
        "mc.step_tokens=4", "actor_optim.lr=1e-4", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
        "reward.name=synthetic", f"checkpoint.run_dir={run_dir}", "logging.progress_bar=false",
        "logging.tensorboard=false", "checkpoint.export_hf_at_end=false",
    ]
    results = run_distributed(_train_body, 2, overrides, timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["ppo", "ppo"]
    for r in rows:
        assert r["mc_requests"] == 2 * 8 * r["mc_boundaries"] and r["mc_tokens"] > 0 and r["t_mc_values"] > 0
        assert "critic/value_loss" not in r and r["critic/optimizer_steps"] == 0 and math.isfinite(r["policy/pg_loss"])
        assert r["rollout_logprob_diff"] < 1e-4
        assert "ev_mc" in r and "mc_ev_mc" not in r  # the values' ev_mc, logged once
    assert all(r["step"] == 2 for r in results)
