"""Shims that let megatron-core 0.19 run on a CPU-only torch with the gloo backend.

megatron-core assumes CUDA in a handful of places. Each shim below names the place that needs it. They are
applied once per process by :func:`install`, and only when CUDA is absent: on a GPU nothing here runs.

Two of them are *silent-wrong-answer* traps rather than crashes, so they are tested by equivalence against
TP=1 (tests/distributed/test_models_parallel.py): the sequence-parallel tag on the torch norms (S6) and the
explicit attention mask (megatron's default causal mask is built on "cuda"). S6 also builds those norms in
params_dtype: megatron's fp32 torch norms in a bf16 model break both optimizers' checkpoint saves
(tests/distributed/test_bf16_distributed_optimizer.py).
"""
from __future__ import annotations

import contextlib
import sys
import types

import torch
from torch.overrides import TorchFunctionMode

_INSTALLED = False


def _is_cuda(device) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class CudaToCpu(TorchFunctionMode):
    """S3: megatron.core hard-codes `device="cuda"` (DDP buffers, schedules, optimizer, clip_grads),
    `pin_memory=True` (context-parallel RoPE slicing), `.cuda()` and `param.type() == "torch.cuda.FloatTensor"`
    (optimizer param grouping). Redirect them."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs = dict(kwargs, device="cpu")
        if kwargs.get("pin_memory"):  # e.g. rope_utils.get_pos_emb_on_this_cp_rank: no pinned memory without CUDA
            kwargs = dict(kwargs, pin_memory=False)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], "cpu", *args[2:])
        return func(*args, **kwargs)


class _SyncEvent:
    """S4: a CUDA event on CPU, already complete (the MoE all-to-all dispatcher synchronises on the event its
    device-to-host copy stream records: token_dispatcher.py `_maybe_dtoh_and_synchronize`)."""

    def synchronize(self):
        pass

    def wait(self, *args, **kwargs):
        pass

    def query(self) -> bool:
        return True


class _SyncStream:
    """S4: CUDA streams and events; on CPU every op is synchronous, so all of these are no-ops."""

    def __init__(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def wait_stream(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def record_event(self, *args, **kwargs):
        return _SyncEvent()


def _stub_paged_stash() -> None:
    """S1: megatron/core/transformer/moe/ops/paged_stash.py does an unguarded `import triton`, reached by
    `import megatron.core` (pipeline_parallel/schedules.py -> transformer/moe/paged_stash.py). Triton is
    CUDA-only and is not installed on CPU; the MoE paged stash is never used by dense models."""
    try:
        import triton  # noqa: F401

        return
    except ImportError:
        pass
    name = "megatron.core.transformer.moe.ops.paged_stash"
    mod = types.ModuleType(name)
    mod.GLOBAL_BLOCK_SIZE = 1024

    def _unavailable(*args, **kwargs):
        raise RuntimeError("the MoE paged stash needs triton and CUDA")

    mod.paged_stash_copy_kernel = mod.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = mod


def _patch_cuda_entry_points() -> None:
    # S2: torch.cuda.current_device() is used as the device of new buffers all over megatron.core
    # (DDP param/grad buffers, rotary embeddings, optimizer state).
    torch.cuda.current_device = lambda: "cpu"
    # S4: streams / synchronize (DDP bucket groups, p2p communication, dist_checkpointing).
    torch.cuda.current_stream = lambda *a, **k: _SyncStream()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Stream = _SyncStream
    torch.cuda.stream = lambda s=None: contextlib.nullcontext()


def _install_rng_tracker() -> None:
    """S5: tensor_parallel/random.py CudaRNGStatesTracker.add/fork call torch.cuda.get/set_rng_state.
    Same tracker over the CPU generator; installed before model_parallel_cuda_manual_seed() so that
    initialize_rng_tracker() keeps it."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        def add(self, name, seed):
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            orig = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(orig)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            orig = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(orig)

    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def _patch_checkpoint_rng() -> None:
    """S7: activation recomputation (tensor_parallel/random.py CheckpointFunction, via _get_all_rng_states /
    _set_all_rng_states) saves and restores the CUDA generator with torch.cuda.random.get_rng_state, which
    fails without CUDA. On CPU there is no CUDA generator: the CPU generator and the (CPU) tracker states are
    saved by the same functions already, so the CUDA part is an empty state and a no-op. Tested by equality
    of gradients with and without recomputation (tests/distributed/test_recompute.py)."""
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mrandom._set_cuda_rng_state = lambda *a, **k: None


def _patch_torch_norm_for_sp() -> None:
    """S6: transformer/torch_norm.py (WrappedTorchNorm, used by the local spec when neither apex nor TE is
    importable) asserts `not config.sequence_parallel`. The same norm without the assert is correct only if
    its parameters are tagged `sequence_parallel`, so that finalize_model_grads all-reduces their gradients
    over TP as it does for apex/TE norms. Without the tag the run goes on with silently wrong gradients.

    The norm is built in `config.params_dtype`, as TE's norms are: megatron's own WrappedTorchNorm builds it in
    fp32 and relies on Float16Module (not used here) to cast the model to bf16. fp32 norms in a bf16 model break
    both optimizers' checkpoints: megatron-core indexes a param group's parameters as if they had one dtype
    (Float16Optimizer.sharded_state_dict maps state ids over bf16 params only; DistributedOptimizer puts fp32
    shards first in the group but numbers parameters in buffer order), so a save fails on a shape mismatch
    (tests/distributed/test_bf16_distributed_optimizer.py)."""
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    def norm_new(cls, config, hidden_size, eps=1e-5, persist_layer_norm=False,
                 zero_centered_gamma=False, normalization="LayerNorm"):
        kinds = {"LayerNorm": torch.nn.LayerNorm, "RMSNorm": torch.nn.RMSNorm}
        if config.normalization not in kinds:
            raise ValueError(f"normalization {config.normalization!r} not supported on CPU; use {sorted(kinds)}")
        module = kinds[config.normalization](normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        for p in module.parameters():
            p.sequence_parallel = config.sequence_parallel
        return module

    WrappedTorchNorm.__new__ = norm_new


def _patch_moe_dispatcher() -> None:
    """S8: megatron's MoE all-to-all token dispatcher (transformer/moe/token_dispatcher.py) on CPU.
    (a) It moves its split sizes "to the host as numpy" with moe_utils.maybe_move_tensor_to_cpu, which converts
    only CUDA tensors; on CPU they stay tensors and gloo's `all_to_all_single` rejects tensor split sizes
    (TypeError). Host tensors are converted too when numpy is asked for, exactly what the CUDA path returns.
    (b) It synchronises on an event recorded by its class-level device-to-host stream. The S4 stream stub would
    do, but vLLM's CPU worker (v1/worker/cpu/shm.py) replaces `torch.cuda.Stream` on import with a placeholder
    whose `record_event` returns None (AttributeError at the first MoE forward after vLLM started), so the
    dispatcher gets its own stub stream here. Tested by the EP=2 logits against EP=1 and HF
    (tests/distributed/test_qwen3_models.py) and the MoE trainer run (tests/distributed/test_trainer_moe.py)."""
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    original = moe_utils.maybe_move_tensor_to_cpu

    def move(tensor, as_numpy: bool = False, record_stream: bool = False):
        if as_numpy and torch.is_tensor(tensor) and not tensor.is_cuda:
            return tensor.numpy()
        return original(tensor, as_numpy=as_numpy, record_stream=record_stream)

    moe_utils.maybe_move_tensor_to_cpu = move
    token_dispatcher.maybe_move_tensor_to_cpu = move
    token_dispatcher.MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = _SyncStream()


def _patch_uneven_first_dim_collectives() -> None:
    """S9: with expert tensor parallelism and EP > 1, megatron's all-to-all dispatcher gathers and reduce-scatters
    the tokens of the expert-TP ranks, which hold different numbers of tokens (tensor_parallel/mappings.py
    `_gather_along_first_dim` / `_reduce_scatter_along_first_dim` with split sizes). NCCL takes uneven lists; gloo's
    all_gather refuses them ("invalid tensor size") and gloo has no reduce_scatter. On CPU the uneven case is done
    with equal-size collectives: the gather pads every part to the largest and cuts the result; the reduce-scatter
    all-reduces the whole tensor and keeps this rank's part (the same sums, more traffic). The even case is
    megatron's own. Tested by the 4-rank TP2 x EP2 x ETP2 logits against HF (tests/distributed/
    test_qwen3_models.py, slow)."""
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    gather, reduce_scatter = mappings._gather_along_first_dim, mappings._reduce_scatter_along_first_dim

    def uneven_gather(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1 or input_.is_cuda:
            return gather(input_, group, output_split_sizes, use_global_buffer)
        longest = max(output_split_sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        parts = [torch.empty_like(padded) for _ in range(group.size())]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, output_split_sizes)])

    def uneven_reduce_scatter(input_, group, input_split_sizes=None, use_global_buffer=False):
        if input_split_sizes is None or group.size() == 1 or input_.is_cuda:
            return reduce_scatter(input_, group, input_split_sizes, use_global_buffer)
        total = input_.contiguous().clone()
        dist.all_reduce(total, group=group)
        return torch.split(total, list(input_split_sizes), dim=0)[group.rank()].contiguous()

    mappings._gather_along_first_dim = uneven_gather
    mappings._reduce_scatter_along_first_dim = uneven_reduce_scatter


def install() -> None:
    """Apply every shim (idempotent). Call before megatron.core is imported."""
    global _INSTALLED
    if _INSTALLED:
        return
    _stub_paged_stash()
    _patch_cuda_entry_points()
    _install_rng_tracker()
    _patch_checkpoint_rng()
    _patch_torch_norm_for_sp()
    _patch_moe_dispatcher()
    _patch_uneven_first_dim_collectives()
    _INSTALLED = True


def activate_device_redirect() -> None:
    """Enter the CudaToCpu mode for the rest of this thread (S3). Torch function modes are per thread:
    worker threads that call into megatron need their own `with CudaToCpu():`."""
    if not any(isinstance(m, CudaToCpu) for m in torch.overrides._get_current_function_mode_stack()):
        CudaToCpu().__enter__()


VLLM_CPU_MOE_ALIGNMENT = 32
"""vLLM 0.32's CPU MoE kernel (fused_moe/experts/cpu_moe.py) zero-pads each expert's intermediate size to a
multiple of 32 when it loads weights; a later in-place weight reload (layerwise reload, what every weight sync
uses) re-processes the checkpoint-shaped tensors and fails copying them into the padded kernel tensors
("The size of tensor a (128) must match the size of tensor b (96)"). Real Qwen3-MoE sizes (768, 1536) are
multiples of 32; tiny test models must be too."""


def repack_vllm_cpu_moe(model: torch.nn.Module) -> int:
    """V1: after an in-place weight reload, put vLLM's CPU MoE expert weights back into the kernel's packed layout.

    vLLM 0.32 (fused_moe/unquantized_fused_moe_method.py `_setup_kernel`) runs the experts kernel's own
    `process_weights_after_loading` only on the first load: for a weight update it copies the checkpoint-layout
    weights into place and skips it, assuming the kernel reads them as they are. The CPU kernel
    (fused_moe/experts/cpu_moe.py) prepacks them into its grouped-GEMM layout there, so after a reload it reads
    raw weights as packed ones (measured: log-probs off by 0.015 after pushing the unchanged weights; the
    expert tensors equal the raw HF layout). Re-running that step on each CPU experts layer restores the packed
    layout. Runs inside the vLLM worker after the reload session; returns the number of layers repacked.
    Tested by the MoE weight sync against Megatron's log-probs (tests/distributed/test_qwen3_models.py)."""
    from vllm.model_executor.layers.fused_moe.experts.cpu_moe import CPUUnquantizedExperts

    repacked = 0
    for layer in model.modules():
        kernel = getattr(getattr(layer, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if isinstance(experts, CPUUnquantizedExperts):
            experts.process_weights_after_loading(layer)
            repacked += 1
    return repacked


def vllm_moe_sync_problem(moe_intermediate_size: int | None) -> str | None:
    """Why vLLM on CPU cannot take weight pushes of a MoE model with this expert size (None: it can)."""
    if moe_intermediate_size and moe_intermediate_size % VLLM_CPU_MOE_ALIGNMENT:
        return (f"moe_intermediate_size {moe_intermediate_size} is not a multiple of {VLLM_CPU_MOE_ALIGNMENT}: "
                f"vLLM's CPU MoE kernel pads it, and its weight reload (every weight sync) then fails")
    return None
