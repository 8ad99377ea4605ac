"""`vapo-train --dry-run`: validate a config for a world size against the model's shape, lay out each role's
process groups and plan the memory, with no GPU and no process group.

Rank groups come from megatron-core's own `RankGenerator` with the order `initialize_model_parallel` uses
("tp-cp-ep-dp-pp": TP ranks adjacent, pipeline stages farthest apart), so the printed groups are the ones a run
would create; a mixture-of-experts layout adds the expert grid megatron folds over the same ranks (etp x ep x
expert-DP x pp, with no cp).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vapo_megatron.config import ConfigError, VapoConfig, validate
from vapo_megatron.config_checks import pool_sizes
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.parallel.layout import ParallelConfig
from vapo_megatron.planning.memory import (
    VLLM_DEFAULT_UTILIZATION,
    VLLM_SEPARATE_UTILIZATION,
    MemoryPlan,
    PlanInput,
    RoleSettings,
    RolloutSettings,
    plan_memory,
)
from vapo_megatron.planning.report import format_plan

MEGATRON_ORDER = "tp-cp-ep-dp-pp"  # megatron.core.parallel_state.initialize_model_parallel's default order
SHOWN_GROUPS = 2


def rank_groups(layout: ParallelConfig, world_size: int) -> dict[str, list[list[int]]]:
    """Every TP, CP, DP and PP group of `layout` on `world_size` ranks, as megatron-core would create them, and
    with ep or etp > 1 the expert groups ("ep", "etp", "edp": expert-parallel, expert tensor-parallel, expert
    data-parallel)."""
    from vapo_megatron import platform

    platform.install_shims()  # megatron-core imports triton-only modules; the shims stand in on CPU
    from megatron.core.parallel_state import RankGenerator

    dp = layout.data_parallel_size(world_size)
    gen = RankGenerator(tp=layout.tp, ep=1, dp=dp, pp=layout.pp, cp=layout.cp, order=MEGATRON_ORDER)
    groups = {name: gen.get_ranks(name) for name in ("tp", "cp", "dp", "pp")}
    if layout.ep > 1 or layout.etp > 1:
        experts = RankGenerator(tp=layout.etp, ep=layout.ep, dp=layout.expert_data_parallel_size(world_size),
                                pp=layout.pp, cp=1, order=MEGATRON_ORDER)
        groups.update(ep=experts.get_ranks("ep"), etp=experts.get_ranks("tp"), edp=experts.get_ranks("dp"))
    return groups


def format_groups(role: str, layout: ParallelConfig, world_size: int) -> str:
    groups = rank_groups(layout, world_size)
    head = (f"{role}: tp {layout.tp} x pp {layout.pp} x cp {layout.cp} x dp {layout.data_parallel_size(world_size)}"
            f" = {world_size}{' (sequence parallel)' if layout.sequence_parallel else ''}")
    if "ep" in groups:
        head += (f"; experts: etp {layout.etp} x ep {layout.ep} x edp {layout.expert_data_parallel_size(world_size)}"
                 f" x pp {layout.pp}")
    lines = [head]
    for name, gs in groups.items():
        if len(gs[0]) == 1 and name in ("cp", "etp"):
            continue  # every rank its own group: nothing to show
        shown = ", ".join(str(g) for g in gs[:SHOWN_GROUPS])
        lines.append(f"  {name} groups ({len(gs)} of {len(gs[0])}): {shown}{', ...' if len(gs) > SHOWN_GROUPS else ''}")
    return "\n".join(lines)


def _role_settings(cfg: VapoConfig, layout: ParallelConfig, optim) -> RoleSettings:
    seq = cfg.rollout.max_prompt_length + cfg.rollout.max_response_length
    # train.recompute / train.micro_batch_tokens are newer fields: read when the config has them.
    micro_tokens = getattr(cfg.train, "micro_batch_tokens", None) or cfg.train.micro_batch_size * seq
    return RoleSettings(tp=layout.tp, pp=layout.pp, cp=layout.cp, sequence_parallel=layout.sequence_parallel,
                        distributed_optimizer=optim.use_distributed_optimizer,
                        recompute=getattr(cfg.train, "recompute", "none"), micro_batch_tokens=micro_tokens,
                        seq_len=seq, ep=layout.ep, etp=layout.etp)


def plan_input_from_config(cfg: VapoConfig, world_size: int, arch: ModelArch, *, gpus_per_node: int = 8,
                           gpu_memory_gib: float = 80.0) -> PlanInput:
    """The memory-plan inputs a config implies on `world_size` GPUs (nodes of `gpus_per_node`); with separate
    placement Megatron is planned on the trainer pool's GPUs and vLLM alone on the rollout pool's."""
    r = cfg.rollout
    trainer_world, rollout_world = pool_sizes(cfg, world_size)
    separate = r.placement == "separate"
    rollout = RolloutSettings(
        vllm_tp=r.vllm_tensor_parallel, max_seq_len=r.max_prompt_length + r.max_response_length,
        gpu_memory_utilization=getattr(r, "gpu_memory_utilization",
                                       VLLM_SEPARATE_UTILIZATION if separate else VLLM_DEFAULT_UTILIZATION),
        offload_megatron=r.offload_megatron_during_rollout, sleep_during_training=r.sleep_between_steps,
        bucket_bytes=r.bucket_bytes, batch_sequences=r.num_prompts * r.n)
    critic = (_role_settings(cfg, cfg.critic_parallel, cfg.critic_optim) if cfg.algorithm.use_critic else None)
    nodes, rest = divmod(trainer_world, gpus_per_node)
    if rest or nodes == 0:  # a partial node: plan the trainer pool as one node of trainer_world GPUs
        nodes, gpus_per_node = 1, trainer_world
    return PlanInput(arch=arch, policy=_role_settings(cfg, cfg.policy_parallel, cfg.actor_optim), critic=critic,
                     rollout=rollout, nodes=nodes, gpus_per_node=gpus_per_node, gpu_memory_gib=gpu_memory_gib,
                     param_bytes=2 if cfg.model.dtype == "bfloat16" else 4,
                     rollout_gpus=rollout_world if separate else 0)


def format_rollout_pool(cfg: VapoConfig, world_size: int) -> str:
    """The vLLM engines and, with separate placement, which ranks hold each pool."""
    r, (trainer_world, rollout_world) = cfg.rollout, pool_sizes(cfg, world_size)
    vtp = r.vllm_tensor_parallel
    if r.placement != "separate":
        return f"vLLM: {world_size // vtp} engine(s) of tp {vtp}, colocated in the trainer ranks"
    return (f"placement separate: trainer pool ranks 0..{trainer_world - 1} ({trainer_world}), rollout pool ranks "
            f"{trainer_world}..{world_size - 1} ({rollout_world}): {rollout_world // vtp} vLLM engine(s) of tp {vtp}; "
            f"max_staleness {r.max_staleness} ({'synchronous' if r.max_staleness == 0 else 'asynchronous'}); weights "
            f"broadcast from trainer rank 0 (docs/async.md)\n"
            "  memory plan below, per pool: the trainer pool's GPUs hold Megatron only (no vLLM, no generation "
            "phase), the rollout pool's vLLM only")


@dataclass
class DryRunResult:
    ok: bool
    """The config is valid for this world size and model."""
    text: str
    plan: MemoryPlan | None = None


def dry_run(cfg: VapoConfig, world_size: int, arch: ModelArch, *, gpus_per_node: int = 8,
            gpu_memory_gib: float = 80.0) -> DryRunResult:
    """Validate, then print the parallel plan and the memory plan. A memory plan that does not fit is reported
    (with remedies) but does not make the config invalid: it is an estimate."""
    try:
        validate(cfg, world_size, arch)
    except ConfigError as exc:
        return DryRunResult(ok=False, text=str(exc))
    lines = [f"config valid for world size {world_size} ({arch.num_layers} layers, hidden {arch.hidden_size})", ""]
    roles = [("policy", cfg.policy_parallel)] + ([("critic", cfg.critic_parallel)] if cfg.algorithm.use_critic else [])
    trainer_world, rollout_world = pool_sizes(cfg, world_size)
    lines += [format_groups(role, layout, trainer_world) for role, layout in roles]
    lines.append(format_rollout_pool(cfg, world_size))
    missing = [f"train.{f}" for f in ("recompute", "micro_batch_tokens")
               if f not in {x.name for x in dataclasses.fields(cfg.train)}]
    if missing:
        lines.append(f"note: this config version has no {', '.join(missing)}: planned as recompute none and "
                     "micro_batch_size x (max_prompt_length + max_response_length) tokens per micro-batch")
    plan = plan_memory(plan_input_from_config(cfg, world_size, arch, gpus_per_node=gpus_per_node,
                                              gpu_memory_gib=gpu_memory_gib))
    lines += ["", format_plan(plan)]
    return DryRunResult(ok=True, text="\n".join(lines), plan=plan)
