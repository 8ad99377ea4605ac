"""Bring a model's TP/PP-sharded parameters (or gradients) back to whole Megatron tensors, one at a time.

Used by weight sync (to vLLM), HF export and the layout-equivalence tests. Peak extra memory is one full
tensor: nothing is materialised for the whole model at once.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from vapo_megatron.convert.mapping import (
    ParamMap,
    ep_owner,
    full_shape,
    merge_tp,
    param_maps,
    stage_local_name,
    stages_of,
)
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.parallel.layout import RoleGroups, current_groups


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def local_tensors(model: torch.nn.Module, getter: Callable[[torch.nn.Parameter], torch.Tensor] | None = None
                  ) -> dict[str, torch.Tensor]:
    """This rank's parameters by local name (through DDP wrappers); `getter` picks e.g. `p.main_grad`."""
    getter = getter or (lambda p: p.detach())
    return {name: getter(p) for name, p in _unwrap(model).named_parameters()}


def _gather_tp(pm: ParamMap, shard: torch.Tensor, arch: ModelArch, group) -> torch.Tensor:
    tp = dist.get_world_size(group)
    if pm.tp_dim is None or tp == 1:
        return merge_tp(pm, [shard], arch) if pm.vocab else shard
    shards = [torch.empty_like(shard) for _ in range(tp)]
    dist.all_gather(shards, shard.contiguous(), group=group)
    return merge_tp(pm, shards, arch)


def iter_full_tensors(model: torch.nn.Module, arch: ModelArch, role: str = "policy", *,
                      getter: Callable[[torch.nn.Parameter], torch.Tensor] | None = None,
                      dtype: torch.dtype | None = None, groups: RoleGroups | None = None
                      ) -> Iterator[tuple[ParamMap, torch.Tensor]]:
    """Yield (ParamMap, whole Megatron tensor) for every parameter, in order, on every rank.

    Collective: every rank of the model-parallel group must iterate in lockstep. TP shards are all-gathered
    within the owning stage (an expert's over the expert-TP group, on the EP rank that holds it, then broadcast
    over the EP group), then the result is broadcast over the pipeline group. `groups`: the role's process
    groups (None: those `parallel.layout.initialize` set up), held by the generator, so that other work (vLLM)
    may run between its items."""
    groups = groups or current_groups(role)
    local = local_tensors(model, getter)
    pp_group = groups.pg.pp
    pp, stage = pp_group.size(), groups.pp_rank
    pp_ranks = dist.get_process_group_ranks(pp_group) if pp > 1 else None
    some = next(iter(local.values()))
    dtype = dtype or some.dtype
    ep_group = groups.pg.ep
    ep, ep_rank = ep_group.size(), ep_group.rank()
    ep_ranks = dist.get_process_group_ranks(ep_group) if ep > 1 else None
    for pm in param_maps(arch, role):
        owner = stages_of(pm, arch, pp, role)[0]
        full = None
        if stage == owner:
            expert_owner = ep_owner(pm, arch, ep)
            if expert_owner is None:
                full = _gather_tp(pm, local[stage_local_name(pm, arch, pp, stage)], arch, groups.pg.tp).to(dtype)
            else:
                if ep_rank == expert_owner:
                    local_name = stage_local_name(pm, arch, pp, stage, ep)
                    full = _gather_tp(pm, local[local_name], arch, groups.pg.expt_tp).to(dtype)
                if ep > 1:
                    if full is None:
                        full = torch.empty(full_shape(pm, arch), dtype=dtype, device=some.device)
                    dist.broadcast(full, src=ep_ranks[expert_owner], group=ep_group)
        if pp > 1:
            if full is None:
                full = torch.empty(full_shape(pm, arch), dtype=dtype, device=some.device)
            dist.broadcast(full, src=pp_ranks[owner], group=pp_group)
        yield pm, full


def full_state_dict(model: torch.nn.Module, arch: ModelArch, role: str = "policy", **kwargs
                    ) -> dict[str, torch.Tensor]:
    """All whole tensors at once (tests and small models only)."""
    return {pm.name: t.clone() for pm, t in iter_full_tensors(model, arch, role, **kwargs)}
