"""Megatron optimizer-state fixes for saving and loading a train checkpoint (engine/checkpoint.py): megatron-core
0.19.2's torch-Adam fallback has no state before the first step and drops or shares Adam's per-parameter `step`
on some save/load paths. Each function names the megatron lines it works around."""
from __future__ import annotations

from typing import Any

import torch


def inner_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def is_torch_adam(opt) -> bool:
    return isinstance(getattr(opt, "optimizer", None), (torch.optim.Adam, torch.optim.AdamW))


def is_distributed(opt) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    return isinstance(opt, DistributedOptimizer)


def ensure_adam_state(optimizer) -> None:
    """Give every parameter an Adam state with a `step` (zero moments and step 0 for parameters that never
    stepped, which is exactly torch Adam's fresh state).

    Why: megatron's torch-Adam fallback has no state before the first step. (1) FP32Optimizer /
    Float16Optimizer `sharded_state_dict` (megatron/core/optimizer/optimizer.py:1355, :1138) then writes no
    moments, so the load template (which `init_state_fn` fills) asks for tensors the checkpoint lacks, e.g.
    for the actor during value pretraining. (2) DistributedOptimizer.state_dict
    (optimizer/distrib_optimizer.py:839) asserts on Adam's per-parameter `step`. The zero state changes no
    later update."""
    for opt in inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or not is_torch_adam(opt) or opt.init_state_fn is None:
            continue
        opt.init_state_fn(opt.optimizer, opt.config)
        for st in opt.optimizer.state.values():
            st.setdefault("step", torch.tensor(0.0))


_DO_PATCHED = False


def loaded_parts(optimizer, loaded: Any) -> list[tuple[Any, Any]]:
    """(inner optimizer, its part of the loaded optimizer state) pairs (chained: {index: state})."""
    inner = inner_optimizers(optimizer)
    return list(zip(inner, [loaded] if len(inner) == 1 else [loaded[k] for k in sorted(loaded)]))


def fill_zero_common_step(optimizer, loaded: Any) -> None:
    """FP32Optimizer / Float16Optimizer save Adam's step once, as `common_step`, but only `if step:`
    (megatron/core/optimizer/optimizer.py:1376 and :1187), i.e. not when it is 0 (a role that has not stepped
    yet). Loading such a checkpoint leaves the moments without `step`, and torch's Adam.__setstate__ raises
    KeyError 'step'. Put the 0 back so that `_restore_common_per_param_step` (optimizer.py:1347) gives every
    parameter its own step, as for any other step."""
    for opt, sd in loaded_parts(optimizer, loaded):
        if getattr(opt, "is_stub_optimizer", False) or is_distributed(opt) or not is_torch_adam(opt):
            continue
        osd = sd["optimizer"] if "state" not in sd and "optimizer" in sd else sd  # Float16 nests it
        if osd.get("state") and "common_step" not in osd["state"]:
            osd["state"]["common_step"] = torch.tensor(0.0)


def patch_distributed_optimizer_step_copy() -> None:
    """megatron/core/optimizer/distrib_optimizer.py:1223 (`_set_main_param_and_optimizer_states`) copies every
    tensor of the inner Adam state, `step` included, from the loaded tensors, which hold only param/exp_avg/
    exp_avg_sq (torch-Adam fallback) -> KeyError 'step'. Keep the current step (restored afterwards by
    `restore_per_param_step`)."""
    global _DO_PATCHED
    if _DO_PATCHED:
        return
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    original = DistributedOptimizer._set_main_param_and_optimizer_states

    def _set(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        state = self.optimizer.state.get(main_param, {})
        if "step" in state and "step" not in tensors:
            tensors = dict(tensors, step=state["step"])
        return original(self, model_param, tensors)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set
    _DO_PATCHED = True


def restore_per_param_step(optimizer) -> None:
    """After `optimizer.load_state_dict`, make sure each parameter has its own Adam `step` tensor.

    DistributedOptimizer (torch-Adam fallback): load_state_dict (megatron/core/optimizer/distrib_optimizer.py:1032)
    puts ONE shared `step` tensor into every parameter's state, which torch Adam then bumps once per parameter
    per step (wrong bias correction after resume: loss 4.400 instead of 4.393 in the CPU probe); the saved step
    is in the param groups: rebuild it per parameter from there. FP32Optimizer / Float16Optimizer already
    restore per-parameter copies (`_restore_common_per_param_step`, optimizer.py:1347)."""
    for opt in inner_optimizers(optimizer):
        if getattr(opt, "is_stub_optimizer", False) or not is_torch_adam(opt):
            continue
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                st = inner.state.get(p)
                if not st:
                    continue
                if is_distributed(opt) and group.get("step") is not None:
                    st["step"] = torch.tensor(float(group["step"]))
                elif "step" not in st:
                    st["step"] = torch.tensor(0.0)
                else:
                    st["step"] = st["step"].detach().clone()


def uses_distributed_optimizer(optimizer) -> bool:
    return any(is_distributed(o) for o in inner_optimizers(optimizer))
