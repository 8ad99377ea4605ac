"""Resuming with new optimizer hyper-parameters: the optimizer state (Adam moments, per-parameter step counts)
carries over from the checkpoint, the run's own values apply from the first step after it.

Why this is needed: megatron-core 0.19.2 pairs the saved param groups with the current ones by a tuple of their
values (`param_group_identifier_keys`: max_lr, min_lr, wd_mult, ... in megatron/core/optimizer/optimizer.py),
so any change of the learning rate failed the load ("Could not find parameter group with key ..."); and torch's
`Optimizer.load_state_dict` would then restore the saved lr, weight decay, betas and eps into the groups, silently
replacing the run's new ones. Here the saved groups are paired with the current ones by their structure alone
(expert-parallel or not, decoupled lr, the lr and weight-decay multipliers: what `_get_param_groups` splits
parameters by, independent of the values), and take the current group's hyper-parameters before megatron's load
sees them; only the saved `step` of a group (the distributed optimizer's Adam step) is kept.

What may change: lr (and the schedule: warmup_steps), weight_decay, clip_grad, adam_beta1/2, adam_eps. What may
not (a clear CheckpointError): the optimizer's type, use_distributed_optimizer and the dtype of its state
(model.dtype), whose saved state has another form; and a mixture-of-experts role's EP / expert TP
(`check_expert_layout`).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vapo_megatron.errors import CheckpointError

MAY_CHANGE = ("lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1", "adam_beta2", "adam_eps", "warmup_steps")
MAY_NOT_CHANGE = {"optimizer": "the optimizer type", "distributed_optimizer": "use_distributed_optimizer",
                  "bf16": "the optimizer state's dtype (model.dtype)"}
_STRUCTURE = ("is_expert_parallel", "is_decoupled_lr", "lr_mult", "wd_mult", "default_config")
_KEEP_SAVED = ("params", "step")


def optimizer_settings(engine: Any) -> dict[str, Any]:
    """The role's optimizer settings as saved in meta.json (from megatron's OptimizerConfig and the engine's
    warmup)."""
    from vapo_megatron.engine.optim_state import uses_distributed_optimizer

    cfg = getattr(engine.optimizer, "config", None)
    if cfg is None:  # a chained optimizer: its parts share one config
        cfg = engine.optimizer.chained_optimizers[0].config
    out = {k: getattr(cfg, k) for k in ("optimizer", "lr", "min_lr", "weight_decay", "clip_grad", "adam_beta1",
                                        "adam_beta2", "adam_eps", "bf16")}
    out["warmup_steps"] = int(engine.optim.warmup_steps)
    out["distributed_optimizer"] = uses_distributed_optimizer(engine.optimizer)
    return out


def compare_settings(role: str, saved: Mapping[str, Any] | None, now: Mapping[str, Any]) -> str | None:
    """CheckpointError for a change that cannot carry over; else a line listing the changed values (None when
    nothing changed or the checkpoint predates saved settings)."""
    if not saved:
        return None
    for key, what in MAY_NOT_CHANGE.items():
        if key in saved and saved[key] != now.get(key):
            raise CheckpointError(
                f"the {role} checkpoint holds optimizer state for {what} = {saved[key]!r}, this run has "
                f"{now.get(key)!r}: that state cannot carry over (its form differs). Resume with the checkpoint's "
                f"setting, or start a new run from exported weights. What may change on resume: "
                f"{', '.join(MAY_CHANGE)}")
    changes = [f"{k} {saved[k]} -> {now[k]}" for k in MAY_CHANGE if k in saved and saved[k] != now.get(k)]
    if not changes:
        return None
    return (f"{role} optimizer: {', '.join(changes)} (checkpoint -> this run; Adam moments and step counts carried "
            "over)")


def _structure(group: Mapping[str, Any]) -> tuple:
    return tuple(group.get(k, group.get(f"pre_{k}")) for k in _STRUCTURE)


def _saved_groups(part: Any) -> list[dict] | None:
    """The list of saved param groups inside one inner optimizer's loaded state (FP32: top level; Float16 and the
    distributed optimizer: under "optimizer")."""
    for sd in (part, part.get("optimizer") if isinstance(part, Mapping) else None):
        if isinstance(sd, Mapping) and isinstance(sd.get("param_groups"), list):
            return sd["param_groups"]
    return None


def adopt_current_param_groups(role: str, parts: list[tuple[Any, Any]]) -> None:
    """Give every saved param group the hyper-parameters of the current group of the same structure, in place
    (`parts`: (inner megatron optimizer, its loaded state dict) pairs)."""
    for opt, part in parts:
        saved = _saved_groups(part) if part is not None else None
        if saved is None or getattr(opt, "is_stub_optimizer", False):
            continue
        current: dict[tuple, list[dict]] = {}
        for group in opt.optimizer.param_groups:
            current.setdefault(_structure(group), []).append(group)
        used: dict[tuple, int] = {}
        for group in saved:
            key = _structure(group)
            i = used.get(key, 0)
            if i >= len(current.get(key, [])):
                raise CheckpointError(
                    f"the {role} checkpoint's optimizer has a parameter group {dict(zip(_STRUCTURE, key))} that this "
                    f"run's optimizer does not have (its groups: "
                    f"{[dict(zip(_STRUCTURE, k)) for k in current]}): the model's parameters or their grouping "
                    "changed, so the optimizer state cannot be matched")
            used[key] = i + 1
            now = current[key][i]
            group.update({k: v for k, v in now.items() if k not in _KEEP_SAVED})


def check_expert_layout(ckpt: Any, meta: dict, engines: Mapping[str, Any]) -> None:
    """Refuse, before anything loads, a mixture-of-experts checkpoint whose optimizer state has another form than
    this run's optimizer.

    The expert parameters have an optimizer of their own at every EP (models/moe.py `tag_expert_parameters`:
    a ChainedOptimizer of a dense and an expert part, state under `chained_0.` / `chained_1.`), so EP and expert
    TP may change on resume: dist_checkpointing reshards the expert state like the weights. Checkpoints written
    before that (meta.json without `expert_optimizer`) at EP = 1 and expert TP = TP hold one optimizer for all
    parameters, with other keys and parameter groups (loading them raised a raw KeyError
    'chained_0.optimizer.state.param...'); they are refused with the ways on. Those saved at EP > 1 or
    expert TP != TP already had both parts and load."""
    for role, eng in engines.items():
        saved = meta["roles"].get(role, {})
        if not eng.arch.is_moe or "ep" not in saved or saved.get("expert_optimizer"):
            continue
        was_split = saved["ep"] > 1 or saved.get("etp", 1) != saved.get("tp", 1)
        if not was_split:
            raise CheckpointError(
                f"checkpoint {ckpt} holds the {role}'s optimizer state in the form of an earlier version (one "
                f"optimizer for dense and expert parameters at ep={saved['ep']}, etp={saved.get('etp', 1)}); this "
                "version gives the experts an optimizer of their own at every expert-parallel size, so that state "
                "cannot be matched. Resume it with the version that wrote it, or start a new run from its exported "
                "weights")
