"""Critic warm start end to end on tiny assets (1 gloo rank): vLLM samples of the initial policy, verifier
scores, a short fit, a HF critic directory; the trainer's critic loader (train.build.critic_hf_get into the
Megatron critic) must give the values the tool computed, which pinpoints a wrong `score` head name or layout, a
wrong trunk naming, or a different value alignment (prompt_len - 1 + t)."""
from __future__ import annotations

import json
import math

import pytest
import torch

from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed
from vapo_megatron.train.warm_start import WarmStartSettings

pytestmark = pytest.mark.distributed


def _body(overrides: list[str], out: str):
    from vapo_megatron.config import load_config
    from vapo_megatron.engine.model_engine import Execution, ModelEngine
    from vapo_megatron.engine.objectives import response_values
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import RoleLayouts, init_distributed
    from vapo_megatron.train.build import critic_hf_get
    from vapo_megatron.train.warm_start import warm_start_critic

    cfg = load_config(None, overrides)
    result = warm_start_critic(cfg, WarmStartSettings(samples_per_prompt=2, max_prompts=6, steps=3, batch_size=4,
                                                      held_out_fraction=0.34), out)
    batch, mask = result.batch, result.batch.resp_mask.bool()
    with torch.no_grad():
        tool_values = result.model.response_values(batch, torch.arange(len(mask)))
    cfg = load_config(None, [*overrides, f"model.critic_hf_dir={out}"])
    arch = load_arch(cfg.model.hf_dir)
    init_distributed()  # the tool is single-process; the Megatron critic needs a process group
    layouts = RoleLayouts(cfg.policy_parallel, cfg.critic_parallel, seed=1234)
    critic = ModelEngine("critic", arch, layouts, cfg.critic_optim, Execution.from_config(cfg),
                         critic_hf_get(cfg, arch))
    loaded = critic.forward(batch, lambda o, mb: response_values(o, mb))
    return result.report, (loaded - tool_values)[mask].abs().max().item(), tool_values[mask].std().item()


def test_warm_start_writes_a_critic_the_trainer_loads(tmp_path):
    save_tiny_hf_model(tmp_path / "model", "qwen2", seed=0)
    write_synthetic_task(tmp_path / "data", num_train=16, num_val=2, num_demonstrations=2, seed=0,
                         difficulty=SyntheticDifficulty(min_steps=1, max_steps=2))
    out = tmp_path / "critic"
    overrides = [f"model.hf_dir={tmp_path / 'model'}", "model.dtype=float32", "rollout.max_prompt_length=64",
                 "rollout.max_response_length=16", "rollout.cpu_kv_cache_bytes=134217728",
                 f"data.train_files=[{tmp_path / 'data' / 'train.jsonl'}]", "reward.name=synthetic",
                 "train.micro_batch_size=4"]
    report, max_diff, spread = run_distributed(_body, 1, overrides, str(out), timeout=600)[0]
    assert report["responses"] == 12 and report["held_out_responses"] == 4 and report["fit_responses"] == 8
    assert json.dumps(json.loads((out / "warm_start.json").read_text())) == json.dumps(report)
    assert spread > 0 and max_diff < 1e-4 * max(1.0, spread * 10), (max_diff, spread)
    assert math.isfinite(report["loss_last"])
