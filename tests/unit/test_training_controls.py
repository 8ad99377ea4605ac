"""Training controls of issue 17: the mini-batch order, the value-pretraining stop rule, critic passes, the
optimizer settings reaching the engine, the refusal of off-policy training samplers and warmup units."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from vapo_megatron.config import ConfigError, load_config, validate
from vapo_megatron.train.controls import minibatch_order, value_pretrain_stop

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


def test_every_optimizer_and_execution_setting_reaches_the_engine():
    """Failure: an OptimConfig field (adam_beta1, weight_decay, ...) is never read by ModelEngine (it takes the
    whole OptimConfig and must use every field), an execution setting of TrainConfig / ModelConfig does not reach
    `Execution`, or the constructor grows back past 8 parameters (issue 22)."""
    import ast
    import dataclasses
    import inspect

    import torch

    from vapo_megatron.config import OptimConfig
    from vapo_megatron.engine import model_engine
    from vapo_megatron.engine.model_engine import Execution, ModelEngine

    tree = ast.parse(inspect.getsource(model_engine))
    read = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "optim"} | {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                                          and isinstance(n.value, ast.Attribute) and n.value.attr == "optim"}
    assert {f.name for f in dataclasses.fields(OptimConfig)} <= read
    cfg = load_config(None, ["train.micro_batch_size=3", "train.micro_batch_tokens=77", "train.pack_sequences=false",
                             "train.recompute=full", "train.recompute_num_layers=2", "model.dtype=bfloat16"])
    assert Execution.from_config(cfg) == Execution(3, 77, False, "full", 2, torch.bfloat16)
    assert len(inspect.signature(ModelEngine.__init__).parameters) - 1 <= 8


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
