"""Parallel layout of one model role (policy or critic): sizes, validation with numbers, process groups."""
from __future__ import annotations

import contextlib
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
    ep: int = 1
    """Expert-parallel size (MoE models): each MoE layer's experts are split over this many ranks; tokens travel
    to their experts by all-to-all. The expert layout is folded over the same ranks as the dense one:
    etp x ep x expert-DP x pp = world size."""
    etp: int = 1
    """Expert tensor-parallel size: each expert's MLP is split over this many ranks (independent of tp)."""

    def seq_multiple(self) -> int:
        """What a padded sequence length must be a multiple of: 8, times tp (sequence parallelism splits the
        sequence over the TP ranks), times 2 * cp (context parallelism's load-balanced split into 2 * cp chunks)."""
        return 8 * self.tp * (2 * self.cp if self.cp > 1 else 1)

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def expert_data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.etp * self.ep * self.pp)

    def _expert_problems(self, world_size: int, num_experts: int | None, moe_ffn_hidden_size: int | None
                         ) -> list[str]:
        problems = []
        expert_mp = self.etp * self.ep * self.pp
        if world_size % expert_mp:
            problems.append(f"world size {world_size} is not divisible by etp({self.etp}) x ep({self.ep}) x "
                            f"pp({self.pp}) = {expert_mp}")
        if (self.ep > 1 or self.etp > 1) and num_experts is not None:  # None: the model is not known here
            if num_experts == 0:
                problems.append(f"ep={self.ep} / etp={self.etp} need a mixture-of-experts model (this one is dense)")
            elif num_experts % self.ep:
                problems.append(f"num_experts {num_experts} is not divisible by ep {self.ep}")
        if num_experts and moe_ffn_hidden_size and moe_ffn_hidden_size % self.etp:
            problems.append(f"moe_intermediate_size {moe_ffn_hidden_size} is not divisible by etp {self.etp}")
        return problems

    def validate(self, world_size: int, *, num_layers: int | None = None, num_heads: int | None = None,
                 num_kv_heads: int | None = None, num_experts: int | None = None,
                 moe_ffn_hidden_size: int | None = None) -> None:
        """Raise ParallelConfigError naming every number involved when the layout is impossible."""
        problems = []
        for name in ("tp", "pp", "cp", "ep", "etp"):
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
        if num_experts and self.tp > 1 and not self.sequence_parallel:
            problems.append(f"a mixture-of-experts model at tp={self.tp} needs sequence_parallel (megatron's MoE "
                            f"layer takes the sequence split over the TP ranks)")
        problems += self._expert_problems(world_size, num_experts, moe_ffn_hidden_size)
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
    else:  # RoleLayouts cleared the group globals but kept the memory buffer (see there)
        parallel_state.destroy_global_memory_buffer()
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


class RoleGroups:
    """The process groups of one role (policy or critic) as megatron-core's `ProcessGroupCollection` (`pg`),
    this rank's coordinates in them, and the role's own megatron RNG-tracker states.

    Passed explicitly to everything megatron-core 0.19.2 lets us pass groups to: GPTModel, DDP,
    finalize_model_grads, the pipeline schedules (with a P2PCommunicator), the vocab-parallel log-probs, the
    context-parallel attention, gathers for weight sync and export. `megatron_globals()` is the one way to hand
    megatron-core's `parallel_state` globals to a call that still reads them; docs/architecture.md lists those
    calls and the megatron-core function each one is for."""

    def __init__(self, role: str, config: ParallelConfig, pg, mpu_globals: dict, rng_states: dict | None):
        self.role, self.config, self.pg = role, config, pg
        self._mpu_globals = mpu_globals
        self.rng_states = rng_states
        """megatron's RNG tracker states of this role (`get_cuda_rng_tracker().get_states()`); None: the role
        uses the tracker as it is (a single layout from `initialize`, nothing to switch)."""

    # ---- this rank's coordinates ----------------------------------------------------------------------
    @property
    def tp_rank(self) -> int:
        return self.pg.tp.rank()

    @property
    def pp_rank(self) -> int:
        return self.pg.pp.rank()

    @property
    def cp_rank(self) -> int:
        return self.pg.cp.rank()

    @property
    def dp_rank(self) -> int:
        return self.pg.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.pg.dp.size()

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pg.pp.size() - 1

    # ---- confined hand-overs to megatron-core --------------------------------------------------------
    def megatron_globals(self):
        """Context manager: megatron-core's `parallel_state` globals are this role's for the duration of ONE call
        that reads them (the call sites are listed in docs/architecture.md); the previous globals come back after."""
        return _swap_globals(self._mpu_globals)

    def rng(self):
        """Context manager: megatron's RNG tracker holds this role's states inside the block; what the block
        drew is kept for the role's next block."""
        return _role_rng(self)


def _mpu_snapshot() -> dict:
    from megatron.core import parallel_state

    return {k: v for k, v in vars(parallel_state).items() if k.startswith("_") and k[1:2].isupper()}


@contextlib.contextmanager
def _swap_globals(snapshot: dict):
    from megatron.core import parallel_state

    previous = _mpu_snapshot()
    vars(parallel_state).update(snapshot)
    try:
        yield
    finally:
        vars(parallel_state).update(previous)


def _tracker():
    from megatron.core import tensor_parallel

    return tensor_parallel.get_cuda_rng_tracker()


@contextlib.contextmanager
def _role_rng(groups: RoleGroups):
    if groups.rng_states is None:
        yield
        return
    tracker = _tracker()
    previous = tracker.get_states()
    tracker.set_states(groups.rng_states)
    try:
        yield
    finally:
        groups.rng_states = tracker.get_states()
        tracker.set_states(previous)


def current_groups(role: str = "current") -> RoleGroups:
    """The groups of the layout that `initialize()` set up last (single-layout scripts and tests; the trainer
    builds its roles with `RoleLayouts`)."""
    from megatron.core import parallel_state
    from megatron.core.process_groups_config import ProcessGroupCollection

    config = ParallelConfig(tp=parallel_state.get_tensor_model_parallel_world_size(),
                            pp=parallel_state.get_pipeline_model_parallel_world_size(),
                            cp=parallel_state.get_context_parallel_world_size())
    return RoleGroups(role, config, ProcessGroupCollection.use_mpu_process_groups(), _mpu_snapshot(), None)


class RoleLayouts:
    """The policy's and the critic's parallel layouts in the same processes: one `RoleGroups` each.

    megatron-core creates groups through `parallel_state.initialize_model_parallel`, which writes module globals;
    each role's groups are created once (`new_group` is collective, so every rank creates both roles' groups)
    and captured as a ProcessGroupCollection, a snapshot of those globals and the RNG-tracker states that
    `model_parallel_cuda_manual_seed` derived for that layout. Afterwards the globals are cleared, so a megatron
    call that reads them outside `RoleGroups.megatron_globals()` fails loudly instead of silently using the
    other role's groups. Roles with equal layouts share the same groups."""

    def __init__(self, policy: ParallelConfig, critic: ParallelConfig, *, seed: int = 1234):
        from megatron.core import parallel_state

        self.configs = {"policy": policy, "critic": critic}
        self.groups: dict[str, RoleGroups] = {}
        for role, config in self.configs.items():
            if role == "critic" and critic == policy:
                g = self.groups["policy"]
                self.groups["critic"] = RoleGroups("critic", critic, g.pg, g._mpu_globals, dict(g.rng_states))
                continue
            initialize(config, seed=seed)
            self.groups[role] = current_groups(role)
            self.groups[role].rng_states = _tracker().get_states()  # seeded for this layout's ranks
        # From here on groups are passed explicitly: clear the globals that name groups, ranks and sizes (not
        # `destroy_model_parallel`, which would also destroy the groups the roles hold). megatron's global
        # memory buffer (used by sequence-parallel all-gathers) stays.
        vars(parallel_state).update({k: None for k in _mpu_snapshot() if k != "_GLOBAL_MEMORY_BUFFER"})

    def use(self, role: str):
        """Context manager for code outside the package (tests, scripts) that reads megatron's globals:
        they are `role`'s inside the block. The package itself never uses it."""
        if role not in self.groups:
            raise ValueError(f"unknown role {role!r}; use 'policy' or 'critic'")
        return self.groups[role].megatron_globals()
