"""Checks of a VapoConfig across its sections, kept apart from config.py's schema and loading: the two pools of
`rollout.placement` (`pool_sizes`, `placement_problems`) and the Monte-Carlo settings (`monte_carlo_problems`).
`config.validate` calls them; nothing here mutates a config."""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vapo_megatron.config import VapoConfig


def pool_sizes(cfg: VapoConfig, world_size: int) -> tuple[int, int]:
    """(trainer ranks, vLLM ranks) of `world_size`: both the whole world when colocated; else the first
    world_size - rollout_ranks ranks train and the last rollout_ranks run vLLM."""
    if cfg.rollout.placement != "separate":
        return world_size, world_size
    return world_size - cfg.rollout.rollout_ranks, cfg.rollout.rollout_ranks


def placement_problems(cfg: VapoConfig, world_size: int) -> list[str]:
    """rollout.placement, rollout_ranks and max_staleness: sizes that cannot work, and the settings that need the
    trainer's own vLLM engine (docs/async.md)."""
    r, a, p = cfg.rollout, cfg.algorithm, []
    if r.placement not in ("colocated", "separate"):
        return [f"rollout.placement={r.placement!r} must be 'colocated' or 'separate'"]
    if r.placement == "colocated":
        return [f"rollout.{k}={v} needs rollout.placement='separate' (colocated: vLLM runs in every trainer rank)"
                for k, v in (("rollout_ranks", r.rollout_ranks), ("max_staleness", r.max_staleness)) if v]
    if r.rollout_ranks < 1 or r.rollout_ranks >= world_size:
        p.append(f"rollout.placement='separate' needs 1 <= rollout.rollout_ranks < world size {world_size} (at least "
                 f"one trainer rank and one vLLM rank), got rollout_ranks={r.rollout_ranks}")
    if r.max_staleness > 0 and a.tis_cap is None:
        p.append(f"rollout.max_staleness={r.max_staleness} trains on samples of older policies: set algorithm.tis_cap "
                 "(e.g. 2.0), the cap of decoupled PPO's behaviour -> proximal importance weight")
    own_engine = [("algorithm.routing_replay=true", a.routing_replay, "records the experts in"),
                  ("rollout.offload_megatron_during_rollout=true", r.offload_megatron_during_rollout,
                   "frees the trainer's memory for"),
                  ("algorithm.value_source='mc'", a.value_source == "mc", "samples Monte-Carlo continuations in"),
                  (f"mc.probe_every={cfg.mc.probe_every}", cfg.mc.probe_every > 0,
                   "samples Monte-Carlo continuations in"),
                  (f"algorithm.mc_critic_weight={a.mc_critic_weight}", a.mc_critic_weight > 0,
                   "samples Monte-Carlo continuations in")]
    p += [f"{key} with rollout.placement='separate': it {what} the trainer's own vLLM engine, which separate "
          "placement has not (docs/async.md)" for key, value, what in own_engine if value]
    return p


def monte_carlo_problems(cfg: VapoConfig) -> list[str]:
    """algorithm.value_source / mc_critic_weight and mc.*: settings the Monte-Carlo values (values/mc.py) cannot
    run with."""
    a, p = cfg.algorithm, []
    if not 0.0 <= a.mc_critic_weight <= 1.0:
        p.append(f"algorithm.mc_critic_weight {a.mc_critic_weight} must be within [0, 1]")
    elif a.mc_critic_weight and not a.use_critic:
        p.append("algorithm.mc_critic_weight > 0 blends Monte-Carlo values into the critic's targets: needs "
                 "algorithm.use_critic=true")
    m = cfg.mc
    uses_mc = a.value_source == "mc" or m.probe_every or a.mc_critic_weight
    if m.step_delimiter in (None, "") and m.step_tokens < 1 and uses_mc:
        p.append("mc.step_delimiter is empty and mc.step_tokens < 1: Monte-Carlo values need step boundaries")
    if min(m.k, m.every_step, m.max_steps, m.probe_rows, m.probe_k) < 1 or m.probe_every < 0:
        p.append(f"mc.k {m.k}, every_step {m.every_step}, max_steps {m.max_steps}, probe_rows {m.probe_rows} and "
                 f"probe_k {m.probe_k} must be >= 1, probe_every {m.probe_every} >= 0")
    return p
