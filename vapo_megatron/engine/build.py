"""Build the policy or critic for this rank: config, model for this pipeline stage, weights, DDP wrapper."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from vapo_megatron import platform
from vapo_megatron.convert.mapping import shard_state_dict
from vapo_megatron.models.critic import build_critic
from vapo_megatron.models.hf_config import ModelArch, transformer_config
from vapo_megatron.models.policy import build_policy
from vapo_megatron.parallel.context import require_context_parallel_support
from vapo_megatron.parallel.layout import ParallelConfig

platform.install_shims()
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig  # noqa: E402

from vapo_megatron.engine.schedule import prepare_config  # noqa: E402


@dataclass
class BuiltModel:
    model: torch.nn.Module  # DDP-wrapped (or bare when ddp=False)
    config: object  # megatron TransformerConfig
    arch: ModelArch
    role: str


def load_full_state(model: torch.nn.Module, full: dict[str, torch.Tensor], arch: ModelArch, role: str) -> None:
    """Copy this rank's shard of a Megatron full state dict into `model` (every parameter must be covered)."""
    local = shard_state_dict(full, arch, role=role, tp=ps.get_tensor_model_parallel_world_size(),
                             tp_rank=ps.get_tensor_model_parallel_rank(),
                             pp=ps.get_pipeline_model_parallel_world_size(),
                             pp_rank=ps.get_pipeline_model_parallel_rank())
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(local))
    unexpected = sorted(set(local) - set(params))
    if missing or unexpected:
        raise KeyError(f"state does not fit the {role} model of this rank: missing {missing}, "
                       f"unexpected {unexpected}")
    with torch.no_grad():
        for name, tensor in local.items():
            if tuple(params[name].shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: model shard has shape {tuple(params[name].shape)}, "
                                 f"checkpoint shard {tuple(tensor.shape)}")
            params[name].copy_(tensor)


def build_model(arch: ModelArch, parallel: ParallelConfig, role: str, *, params_dtype=torch.float32,
                full_state: dict[str, torch.Tensor] | None = None, ddp: bool = True,
                use_distributed_optimizer: bool = False, **config_overrides) -> BuiltModel:
    """The `role` model ("policy" or "critic") of this rank, in megatron's current parallel state."""
    parallel.validate(torch.distributed.get_world_size(), num_layers=arch.num_layers, num_heads=arch.num_heads,
                      num_kv_heads=arch.num_kv_heads)
    require_context_parallel_support(parallel.cp, role)
    config = transformer_config(arch, parallel, params_dtype=params_dtype, **config_overrides)
    prepare_config(config)
    kwargs = dict(pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    model = build_policy(arch, config, **kwargs) if role == "policy" else build_critic(arch, config, **kwargs)
    if platform.has_cuda():
        model.cuda(torch.cuda.current_device())
    if full_state is not None:
        load_full_state(model, full_state, arch, role)
    if ddp:
        ddp_config = DistributedDataParallelConfig(
            use_distributed_optimizer=use_distributed_optimizer, overlap_grad_reduce=False,
            grad_reduce_in_fp32=True)
        model = DistributedDataParallel(config, ddp_config, model)
        config.no_sync_func = model.no_sync
    return BuiltModel(model=model, config=config, arch=arch, role=role)
