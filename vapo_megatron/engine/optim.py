"""megatron-core optimizer for a DDP-wrapped model (Adam(W), gradient clipping, optional distributed optimizer)."""
from __future__ import annotations

import torch
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

from vapo_megatron.parallel.layout import RoleGroups


def build_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float = 0.0, clip_grad: float = 1.0,
                    adam_beta1: float = 0.9, adam_beta2: float = 0.999, adam_eps: float = 1e-8,
                    bf16: bool = False, use_distributed_optimizer: bool = False, groups: RoleGroups | None = None):
    """AdamW over `model`'s parameters through megatron-core (fp32 master weights when bf16).

    Built inside `groups.megatron_globals()` (a confined call, docs/architecture.md): with an explicit
    `pg_collection`, megatron-core 0.19.2's `get_megatron_optimizer` refuses gloo process groups, which the
    DistributedOptimizer uses on CPU; from the globals it takes the role's groups (gloo ones included) and keeps
    them, so its `step()` needs no globals."""
    config = OptimizerConfig(
        optimizer="adam", lr=lr, weight_decay=weight_decay, clip_grad=clip_grad, adam_beta1=adam_beta1,
        adam_beta2=adam_beta2, adam_eps=adam_eps, bf16=bf16, fp16=False,
        params_dtype=torch.bfloat16 if bf16 else torch.float32, use_distributed_optimizer=use_distributed_optimizer)
    if groups is None:  # single-layout scripts: the globals `parallel.layout.initialize` set up
        return get_megatron_optimizer(config, [model])
    with groups.megatron_globals():
        return get_megatron_optimizer(config, [model])
