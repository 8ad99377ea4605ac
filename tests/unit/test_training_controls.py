"""Training controls of issue 17: the mini-batch order, the value-pretraining stop rule, critic passes, the
optimizer settings reaching the engine, the refusal of off-policy training samplers and warmup units."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vapo_megatron.config import ConfigError, load_config, validate
from vapo_megatron.trainer_parts import engine_kwargs, minibatch_order, value_pretrain_stop

ROOT = Path(__file__).resolve().parents[2]


def _problems(*overrides: str) -> list[str]:
    cfg = load_config(None, ["model.hf_dir=m", "data.train_files=[t.jsonl]", *overrides])
    try:
        validate(cfg, 1)
    except ConfigError as e:
        return e.problems
    return []


def test_minibatch_order_differs_per_step_and_is_reproducible():
    """Failure: every step shuffles its mini-batches the same way (seeded without the step), or the order is
    not a function of (seed, step, epoch) alone (a resumed run would draw another)."""
    orders = [minibatch_order(64, 0, step, 0).tolist() for step in range(1, 6)]
    assert len({tuple(o) for o in orders}) == 5
    assert minibatch_order(64, 0, 3, 0).tolist() == orders[2]
    assert minibatch_order(64, 0, 3, 1).tolist() != orders[2]
    assert minibatch_order(64, 1, 3, 0).tolist() != orders[2]
    assert sorted(orders[0]) == list(range(64))


@pytest.mark.parametrize("step,cap,ev,threshold,want", [
    (1, 5, 0.4, 0.3, "ev_threshold"), (5, 5, 0.4, 0.3, "ev_threshold"), (2, 5, 0.2, 0.3, None),
    (5, 5, 0.2, 0.3, "step_cap"), (5, 5, 0.9, None, "step_cap"), (3, 5, float("nan"), 0.3, None),
    (3, 5, None, 0.3, None),
])
def test_value_pretrain_stop(step, cap, ev, threshold, want):
    """Failure: the stop rule ignores ev_mc, stops on NaN, or misses the step cap."""
    assert value_pretrain_stop(step, cap, ev, threshold) == want


def test_adam_betas_reach_the_engine():
    """Failure: OptimConfig.adam_beta1/adam_beta2 are not passed to the optimizer (every OptimConfig field must
    reach ModelEngine)."""
    import inspect

    from vapo_megatron.engine.model_engine import ModelEngine

    cfg = load_config(None, ["actor_optim.adam_beta1=0.8", "actor_optim.adam_beta2=0.95"])
    kwargs = engine_kwargs(cfg, cfg.actor_optim)
    assert (kwargs["adam_beta1"], kwargs["adam_beta2"]) == (0.8, 0.95)
    assert set(kwargs) <= set(inspect.signature(ModelEngine).parameters)
    for name in ("lr", "weight_decay", "clip_grad", "warmup_steps", "use_distributed_optimizer"):
        assert kwargs[name] == getattr(cfg.actor_optim, name)


@pytest.mark.parametrize("override", ["rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=50"])
def test_off_policy_training_sampler_refused(override):
    """Failure: a training sampler other than the full temperature-1 distribution is accepted although the PPO
    ratio's old log-probs are those of that distribution."""
    assert any("training rollouts must sample the full temperature-1 distribution" in p for p in _problems(override))
    assert not _problems("eval.temperature=0.7", "eval.top_p=0.7")


def test_critic_epochs_validated():
    """Failure: train.critic_epochs=0 is accepted."""
    assert any("train.critic_epochs=0 must be >= 1 or null" in p for p in _problems("train.critic_epochs=0"))
    assert not _problems("train.critic_epochs=4")


def test_example_warmup_comments_count_optimizer_steps():
    """Failure: an example says its warmup spans N rollout steps while warmup_steps (optimizer steps) is not
    N x optimizer steps per rollout step."""
    checked = 0
    for path in sorted((ROOT / "examples").rglob("*.yaml")):
        text = path.read_text()
        data = yaml.safe_load(text)
        for role in ("actor_optim", "critic_optim"):
            line = next((ln for ln in text.splitlines() if ln.strip().startswith("warmup_steps:")), "")
            m = re.search(r"(\d+) rollout steps", line)
            if not m or "warmup_steps" not in (data.get(role) or {}):
                continue
            r, t = data["rollout"], data["train"]
            per_rollout = r["num_prompts"] * r["n"] // t["mini_batch_size"] * t.get("ppo_epochs", 1)
            assert data[role]["warmup_steps"] == int(m.group(1)) * per_rollout, f"{path}: {line}"
            checked += 1
    assert checked >= 3
