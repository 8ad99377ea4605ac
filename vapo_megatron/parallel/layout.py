"""Parallel layout of one model role (policy or critic): sizes, validation with numbers, process groups."""
from __future__ import annotations

from dataclasses import dataclass


class ParallelConfigError(ValueError):
    """An impossible combination of parallel sizes, model shape and world size."""


@dataclass(frozen=True)
class ParallelConfig:
    """How one model is split over ranks. DP is derived: world_size / (tp * pp * cp)."""

    tp: int = 1
    """Tensor-parallel size: attention heads, MLP columns and the vocabulary are split over this many ranks."""
    pp: int = 1
    """Pipeline-parallel size: transformer layers are split into this many consecutive stages."""
    cp: int = 1
    """Context-parallel size: each sequence is split into 2 x cp chunks over this many ranks (long responses).
    Attention is TransformerEngine's ring attention when TE runs, else an all-gather of keys/values
    (parallel/context.py, models/cp_attention.py)."""
    sequence_parallel: bool = False
    """Shard norms/dropout activations along the sequence over the TP ranks (needs tp > 1)."""

    def seq_multiple(self) -> int:
        """What a padded sequence length must be a multiple of: 8, times tp (sequence parallelism splits the
        sequence over the TP ranks), times 2 * cp (context parallelism's load-balanced split into 2 * cp chunks)."""
        return 8 * self.tp * (2 * self.cp if self.cp > 1 else 1)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def validate(self, world_size: int, *, num_layers: int | None = None, num_heads: int | None = None,
                 num_kv_heads: int | None = None) -> None:
        """Raise ParallelConfigError naming every number involved when the layout is impossible."""
        problems = []
        for name in ("tp", "pp", "cp"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be >= 1")
        if problems:
            raise ParallelConfigError("; ".join(problems))
        model_parallel = self.tp * self.pp * self.cp
        if world_size % model_parallel:
            problems.append(f"world size {world_size} is not divisible by tp({self.tp}) x pp({self.pp}) x "
                            f"cp({self.cp}) = {model_parallel}")
        if num_heads is not None and num_heads % self.tp:
            problems.append(f"num_attention_heads {num_heads} is not divisible by tp {self.tp}")
        if num_kv_heads is not None and num_kv_heads % self.tp:
            problems.append(f"num_key_value_heads {num_kv_heads} is not divisible by tp {self.tp} "
                            f"(each TP rank must hold whole query groups)")
        if num_layers is not None and num_layers % self.pp:
            problems.append(f"num_layers {num_layers} is not divisible by pp {self.pp}")
        if self.sequence_parallel and self.tp == 1:
            problems.append("sequence_parallel needs tp > 1 (tp=1)")
        if problems:
            raise ParallelConfigError("invalid parallel layout: " + "; ".join(problems))


def initialize(config: ParallelConfig, *, seed: int = 1234) -> None:
    """Create megatron-core's process groups for `config` on the already-initialised default group, and seed
    the model-parallel RNG tracker. The default group must exist (torchrun or the test harness)."""
    import torch
    import torch.distributed as dist

    from vapo_megatron import platform

    platform.setup()
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: launch with torchrun or call "
                           "vapo_megatron.parallel.layout.init_distributed() first")
    config.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=config.tp, pipeline_model_parallel_size=config.pp,
        context_parallel_size=config.cp, create_gloo_process_groups=not platform.has_cuda())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    torch.manual_seed(seed)


def init_distributed() -> None:
    """Initialise the default process group from torchrun's environment (single process when absent)."""
    import os

    import torch.distributed as dist

    from vapo_megatron import platform

    platform.setup()
    if dist.is_initialized():
        return
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(platform.free_port())
    if platform.has_cuda():
        import torch

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(platform.dist_backend())


class RoleLayouts:
    """Separate megatron-core parallel layouts for the policy and the critic in the same processes.

    megatron-core keeps its process groups in module globals of `parallel_state`, read at run time by the
    schedules, DDP, finalize_model_grads and the tensor-parallel layers. Each role's groups are created once
    (`new_group` is collective, so every rank creates both) and their globals snapshotted; `use(role)` swaps
    that role's snapshot in for the duration of the block. Roles with equal layouts share one snapshot."""

    def __init__(self, policy: ParallelConfig, critic: ParallelConfig, *, seed: int = 1234):
        from megatron.core import parallel_state

        self._ps = parallel_state
        self.configs = {"policy": policy, "critic": critic}
        self._snapshots: dict[str, dict] = {}
        initialize(policy, seed=seed)
        self._snapshots["policy"] = self._snapshot()
        if critic == policy:
            self._snapshots["critic"] = self._snapshots["policy"]
        else:
            initialize(critic, seed=seed)
            self._snapshots["critic"] = self._snapshot()
        self._active = "critic" if critic != policy else "policy"
        self._activate("policy")

    def _snapshot(self) -> dict:
        return {k: v for k, v in vars(self._ps).items() if k.startswith("_") and k[1:2].isupper()}

    def _activate(self, role: str) -> None:
        vars(self._ps).update(self._snapshots[role])
        self._active = role

    def use(self, role: str):
        """Context manager: megatron's global process groups are those of `role` inside the block."""
        import contextlib

        if role not in self._snapshots:
            raise ValueError(f"unknown role {role!r}; use 'policy' or 'critic'")

        @contextlib.contextmanager
        def _ctx():
            previous = self._active
            self._activate(role)
            try:
                yield self
            finally:
                self._activate(previous)

        return _ctx()
