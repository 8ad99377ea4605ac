"""Build the policy or critic for this rank: config, model for this pipeline stage, weights, DDP wrapper."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from vapo_megatron import platform
from vapo_megatron.convert.mapping import check_covers, copy_shard, load_local_shards, shard_state_dict
from vapo_megatron.engine.schedule import prepare_config
from vapo_megatron.models.critic import build_critic
from vapo_megatron.models.hf_config import ModelArch, transformer_config
from vapo_megatron.models.moe import prepare_routers, tag_expert_parameters
from vapo_megatron.models.policy import build_policy
from vapo_megatron.parallel.layout import ParallelConfig, RoleGroups, current_groups

HFGetter = Callable[[str], torch.Tensor]  # HF tensor name -> tensor


@dataclass
class BuiltModel:
    model: torch.nn.Module  # DDP-wrapped (or bare when ddp=False)
    config: object  # megatron TransformerConfig
    arch: ModelArch
    role: str
    groups: RoleGroups  # the process groups it was built in


def _rank_layout(groups: RoleGroups | None) -> dict[str, int]:
    g = (groups or current_groups()).pg
    return dict(tp=g.tp.size(), tp_rank=g.tp.rank(), pp=g.pp.size(), pp_rank=g.pp.rank(), ep=g.ep.size(),
                ep_rank=g.ep.rank(), etp=g.expt_tp.size(), etp_rank=g.expt_tp.rank())


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], arch: ModelArch, role: str,
                    groups: RoleGroups | None = None) -> None:
    """Copy this rank's shard of a Megatron full state dict into `model` (every parameter must be covered).
    For a full state that is already in memory (an edited one); initial weights stream (`load_hf_weights`).
    `groups`: the role's process groups (None: those `parallel.layout.initialize` set up)."""
    local = shard_state_dict(full, arch, role=role, **_rank_layout(groups))
    params = dict(model.named_parameters())
    check_covers(params, local, role)
    with torch.no_grad():
        for name, tensor in local.items():
            copy_shard(params[name], name, tensor)


def load_hf_weights(model: torch.nn.Module, hf_get: HFGetter, arch: ModelArch, role: str,
                    groups: RoleGroups | None = None) -> None:
    """Stream this rank's parameters from HF tensors (`hf_get(name)`, e.g. `HFCheckpointReader.get`): only the
    tensors of this pipeline stage are read, one parameter at a time, and only this TP rank's piece is kept
    (peak host memory: about one full tensor, the largest being the embedding)."""
    load_local_shards(dict(model.named_parameters()), hf_get, arch, role, **_rank_layout(groups))


def build_model(arch: ModelArch, parallel: ParallelConfig, role: str, *, params_dtype=torch.float32,
                hf_get: HFGetter | None = None, full_state: dict[str, torch.Tensor] | None = None,
                ddp: bool = True, use_distributed_optimizer: bool = False, groups: RoleGroups | None = None,
                **config_overrides) -> BuiltModel:
    """The `role` model ("policy" or "critic") of this rank in the process groups `groups` (None: those that
    `parallel.layout.initialize` set up last), with its weights streamed from HF tensors (`hf_get`), or sliced
    from a Megatron full state dict already in memory (`full_state`), or left at megatron's random init
    (neither). The groups go to GPTModel and DDP explicitly; the role's RNG tracker is active while building."""
    if hf_get is not None and full_state is not None:
        raise ValueError("build_model: pass hf_get or full_state, not both")
    parallel.validate(torch.distributed.get_world_size(), num_layers=arch.num_layers, num_heads=arch.num_heads,
                      num_kv_heads=arch.num_kv_heads, num_experts=arch.num_experts,
                      moe_ffn_hidden_size=arch.moe_ffn_hidden_size)
    groups = groups or current_groups(role)
    config = transformer_config(arch, parallel, params_dtype=params_dtype, **config_overrides)
    prepare_config(config)
    kwargs = dict(pre_process=groups.is_first_stage, post_process=groups.is_last_stage, pg_collection=groups.pg)
    with groups.rng():  # TP-sharded layers draw their initial weights from the tracker
        model = build_policy(arch, config, **kwargs) if role == "policy" else build_critic(arch, config, **kwargs)
    if arch.is_moe:
        prepare_routers(model)
        tag_expert_parameters(model)  # one optimizer layout at every EP (resumable at another EP)
    if platform.has_cuda():
        model.cuda(torch.cuda.current_device())
    if hf_get is not None:
        load_hf_weights(model, hf_get, arch, role, groups)
    elif full_state is not None:
        load_full_state(model, full_state, arch, role, groups)
    if ddp:
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer, overlap_grad_reduce=False,
            grad_reduce_in_fp32=True)
        model = DistributedDataParallel(config, ddp_config, model, pg_collection=groups.pg)
        config.no_sync_func = model.no_sync
    return BuiltModel(model=model, config=config, arch=arch, role=role, groups=groups)
