"""Move a Megatron role's training state off the accelerator while vLLM generates, and back afterwards.

What moves, per engine (policy, critic):
- parameters and module buffers (with the distributed optimizer these are views into DDP's contiguous
  param buffer, which then moves as one storage),
- the optimizer's tensors: fp32 main params (or their distributed-optimizer shards) and Adam's exp_avg /
  exp_avg_sq, read from the torch optimizer(s) inside megatron's (Chained)Optimizer,
- DDP's gradient buffers, through megatron-core's own `DistributedDataParallel.offload_grad_buffers` /
  `restore_grad_buffers`: the storage is freed, not copied, and comes back zeroed. Gradients are dead between
  optimizer steps (every train step starts with `zero_grad_buffer`), so nothing is lost.

How: storage by storage. Each distinct storage on the `home` device is copied into a host buffer (pinned when
CUDA is present; reused from one offload to the next) and then resized to 0 bytes; `reload` resizes it back and
copies the bytes in. Every tensor viewing that storage - a parameter, `main_grad`, a distributed-optimizer shard
- stays the same Python object with the same view, so no reference held by megatron goes stale.
megatron-core's `MegatronOptimizer.offload_to_cpu` is not used: it replaces `p.data` with fresh, unpinned copies
(breaking the aliasing between fp32 shards and the param buffer) and touches only CUDA tensors, so it could not
be exercised off a GPU either.

What a CPU test can and cannot show: with home="cpu" the same code frees and restores real storages, so a tensor
that was missed, a view that went stale or bytes restored to the wrong storage show up as a crash or as a
training step that is not bit-identical (tests/distributed/test_offload.py). That the device memory is actually
returned to the CUDA caching allocator, and the cost of the copies, only a GPU shows
(tests/gpu/test_offload_cuda.py skips without CUDA).
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator

import torch

logger = logging.getLogger(__name__)


def torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a megatron-core optimizer (ChainedOptimizer or a single one)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    inner = chained if chained is not None else [optimizer]
    return [o.optimizer for o in inner if getattr(o, "optimizer", None) is not None
            and not getattr(o, "is_stub_optimizer", False)]


def optimizer_tensors(optimizer) -> Iterator[torch.Tensor]:
    """Every tensor the optimizer steps with: its (main) params and its per-param state (exp_avg, ...)."""
    for opt in torch_optimizers(optimizer):
        for group in opt.param_groups:
            yield from (p for p in group["params"] if isinstance(p, torch.Tensor))
        for state in opt.state.values():
            yield from (v for v in state.values() if isinstance(v, torch.Tensor))


def model_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers of a (DDP-wrapped) megatron model. Gradient buffers are not among them."""
    inner = getattr(model, "module", model)  # megatron's DDP shadows nn.Module.buffers() with its grad buffers
    yield from inner.parameters()
    yield from inner.buffers()


def _bytes(storage: torch.UntypedStorage) -> torch.Tensor:
    """A flat uint8 tensor over all of `storage` (for byte-exact copies whatever the dtypes viewing it)."""
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage, 0, (storage.nbytes(),))


class StateOffloader:
    """Offloads the training state of some engines from `home` to `host` memory and back.

    `engines` are objects with `.model` (megatron DDP) and `.optimizer` (megatron optimizer). `home` is the
    device the state lives on ("cuda:N" in training; "cpu" in the CPU tests), `host` where it waits."""

    def __init__(self, engines: Iterable, *, home: torch.device | str, host: torch.device | str = "cpu",
                 pin_memory: bool | None = None):
        self.engines = list(engines)
        self.home, self.host = torch.device(home), torch.device(host)
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self._host_buffers: dict[int, torch.Tensor] = {}  # storage id (StorageImpl) -> host copy
        self._offloaded: list[torch.UntypedStorage] = []
        self.offloaded_bytes = 0

    @property
    def is_offloaded(self) -> bool:
        return bool(self._offloaded)

    def storages(self) -> list[torch.UntypedStorage]:
        """Distinct non-empty storages on `home` of every engine's params, buffers and optimizer tensors."""
        seen: dict[int, torch.UntypedStorage] = {}
        for engine in self.engines:
            for t in (*model_tensors(engine.model), *optimizer_tensors(engine.optimizer)):
                if not self._is_home(t.device):
                    continue
                s = t.untyped_storage()
                if s.nbytes() > 0:
                    seen.setdefault(s._cdata, s)
        return list(seen.values())

    def _is_home(self, device: torch.device) -> bool:
        return device.type == self.home.type and (self.home.index is None or device.index == self.home.index)

    def offload(self) -> int:
        """Free the state on `home` (collective-free, per rank). Returns the bytes moved to host (grad buffers,
        freed without a copy, not counted). RuntimeError if already offloaded."""
        if self._offloaded:
            raise RuntimeError("offload() called twice without reload(): the state is already on the host")
        storages = self.storages()
        live = {s._cdata for s in storages}
        self._host_buffers = {k: v for k, v in self._host_buffers.items() if k in live}
        for s in storages:
            host = self._host_buffers.get(s._cdata)
            if host is None or host.numel() != s.nbytes():
                host = torch.empty(s.nbytes(), dtype=torch.uint8, device=self.host, pin_memory=self.pin_memory)
                self._host_buffers[s._cdata] = host
            host.copy_(_bytes(s), non_blocking=self.pin_memory)
        if self.home.type == "cuda":
            torch.cuda.synchronize(self.home)  # the copies must land before the storages go
        for s in storages:
            s.resize_(0)
        for engine in self.engines:
            engine.model.offload_grad_buffers(synchronize=False, empty_cache=False)
        self._offloaded = storages
        self.offloaded_bytes = sum(h.numel() for h in self._host_buffers.values())
        if self.home.type == "cuda":
            torch.cuda.empty_cache()
        return self.offloaded_bytes

    def reload(self) -> None:
        """Reallocate every offloaded storage on `home` and copy its bytes back; grad buffers come back zeroed."""
        if not self._offloaded:
            raise RuntimeError("reload() without a preceding offload()")
        for s in self._offloaded:
            host = self._host_buffers[s._cdata]
            s.resize_(host.numel())
            _bytes(s).copy_(host, non_blocking=self.pin_memory)
        for engine in self.engines:
            engine.model.restore_grad_buffers(synchronize=False)
        if self.home.type == "cuda":
            torch.cuda.synchronize(self.home)
        self._offloaded = []

    @contextlib.contextmanager
    def offloaded(self):
        """State on the host inside the block, back on `home` after it (also when the block raises)."""
        self.offload()
        try:
            yield self
        finally:
            self.reload()


class _NoOffload:
    """The switch on a machine without CUDA: Megatron's state already lives in host memory."""

    _announced = False

    @contextlib.contextmanager
    def offloaded(self):
        if not _NoOffload._announced:
            logger.info("rollout.offload_megatron_during_rollout: no CUDA device, Megatron's state already lives "
                        "in host memory; nothing is moved")
            _NoOffload._announced = True
        yield self


class _Disabled:
    @contextlib.contextmanager
    def offloaded(self):
        yield self


def rollout_offloader(engines: Iterable, enabled: bool):
    """What the trainer wraps generation in: a real StateOffloader on CUDA when `enabled`; a no-op (logged
    once) without CUDA; a silent no-op when disabled."""
    from vapo_megatron import platform

    if not enabled:
        return _Disabled()
    if not platform.has_cuda():
        return _NoOffload()
    return StateOffloader([e for e in engines if e is not None], home=platform.device(), host="cpu")
