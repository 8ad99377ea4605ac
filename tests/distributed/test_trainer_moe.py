"""The VAPO trainer on a tiny Qwen3-MoE policy and critic, both at expert parallelism 2 on 2 gloo ranks: vLLM
rollouts from the synced MoE policy (HF per-expert tensors into vLLM's fused experts), critic values, updates
with the routers' load-balancing loss, router metrics in metrics.jsonl, a checkpoint after every step, and an exact
resume: dropping the last checkpoint and resuming gives the same step again (same samples, losses, gradient norms,
router metrics). A failure pinpoints the MoE plumbing of the trainer: expert sync, expert checkpoint shards, the
expert optimizer state or its RNG.

With `algorithm.routing_replay` the trainer records vLLM's experts after each rollout and the policy replays them in
its old-log-prob and update forwards: every update reports the replayed tokens, and the old log-probs computed
under the replayed routing still match vLLM's. A trainer that ignored the switch would either not record (the
replaying engine refuses a batch without `routed_experts`) or not replay (no `moe_replayed_tokens`)."""
from __future__ import annotations

import json
import math
import shutil

import pytest

from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
MOE_METRICS = ("moe_tokens_per_expert_max", "moe_tokens_per_expert_mean", "moe_load_max_over_mean", "moe_aux_loss")


def _run_body(overrides: list[str], resume: bool):
    import torch.distributed as dist

    from vapo_megatron.config import load_config, validate
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.train.loop import Trainer

    cfg = load_config(None, overrides)
    validate(cfg, dist.get_world_size(), load_arch(cfg.model.hf_dir))
    return Trainer(cfg, resume=resume).run()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_tiny_hf_model(root / "model", "qwen3_moe", seed=0, hidden_size=64, num_heads=4, num_kv_heads=2,
                       head_dim=32, intermediate_size=96, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=64, mlp_only_layers=[1], router_aux_loss_coef=0.01)
    write_synthetic_task(root / "data", num_train=64, num_val=8, num_demonstrations=8, seed=0,
                         difficulty=SyntheticDifficulty(min_steps=1, max_steps=2))
    return root


def _overrides(assets, run_dir) -> list[str]:
    return [
        f"model.hf_dir={assets / 'model'}", "model.dtype=float32", "policy_parallel.ep=2", "critic_parallel.ep=2",
        "rollout.num_prompts=4", "rollout.n=2", "rollout.max_prompt_length=64", "rollout.max_response_length=16",
        "rollout.cpu_kv_cache_bytes=134217728", "train.steps=2", "train.mini_batch_size=4",
        "train.micro_batch_size=2", "algorithm.value_pretrain_steps=0", "actor_optim.lr=1e-3",
        "critic_optim.lr=1e-3", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]", "reward.name=synthetic",
        f"checkpoint.run_dir={run_dir}", "checkpoint.save_every=1", "checkpoint.keep_last=5",
        "logging.progress_bar=false", "logging.tensorboard=false",
    ]


def test_moe_policy_and_critic_at_ep2_train_checkpoint_and_resume_exactly(assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(assets, run_dir)
    full = run_distributed(_run_body, 2, overrides, False, timeout=900)[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = rows[-1]
    assert last["rollout_logprob_diff"] < 1e-4, "vLLM and the EP2 MoE policy disagree: expert sync broken"
    assert last["policy/skipped"] == 0 and last["critic/skipped"] == 0
    for key in MOE_METRICS:
        assert f"policy/{key}" in last and f"critic/{key}" in last, f"metrics.jsonl lacks {key}"
    assert last["policy/moe_tokens_per_expert_max"] >= last["policy/moe_tokens_per_expert_mean"] > 0
    assert last["policy/moe_load_max_over_mean"] >= 1.0
    assert math.isfinite(last["policy/moe_aux_loss"]) and last["policy/moe_aux_loss"] > 0

    shutil.rmtree(sorted((run_dir / "checkpoints").glob("step_*"))[-1])
    resumed = run_distributed(_run_body, 2, overrides, True, timeout=900)[0]
    assert full["step"] == resumed["step"]
    compared = [k for k, v in full.items() if isinstance(v, float) and not k.startswith("t_")]
    assert {"policy/pg_loss", "critic/value_loss", "policy/grad_norm", "policy/moe_aux_loss",
            "rollout_logprob_diff"} <= set(compared)
    differ = [f"{k}: {resumed[k]} vs {full[k]}" for k in compared
              if not (math.isnan(full[k]) and math.isnan(resumed[k]))
              and not abs(resumed[k] - full[k]) <= 1e-6 * max(1.0, abs(full[k]))]
    assert not differ, differ


def test_routing_replay_switch_in_the_trainer(assets, tmp_path):
    run_dir = tmp_path / "run"
    overrides = _overrides(assets, run_dir) + ["algorithm.routing_replay=true", "train.ppo_epochs=2"]
    run_distributed(_run_body, 2, overrides, False, timeout=900)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ppo = [r for r in rows if r.get("phase") == "ppo"]
    assert len(ppo) == 2
    for r in ppo:
        assert r["policy/moe_replayed_tokens"] > 0, "the policy's update forwards did not replay the recorded experts"
        assert 0 <= r["policy/moe_replay_changed_frac"] <= 1
        assert "t_routing_record" in r
        assert r["rollout_logprob_diff"] < 1e-4, "old log-probs under vLLM's recorded routing differ from vLLM's"
        assert "critic/moe_replayed_tokens" not in r  # the critic routes by itself
