"""The colocated transport: the vLLM engine lives in the trainer's own process, buckets reach its worker by
reference (no bytes are serialised).

A push is one vLLM reload *session*: begin (every vLLM layer is set up to buffer incoming checkpoint-format
weights), one RPC per bucket (`model.load_weights(bucket)`: HF names, vLLM's own name mapping, fusing of q/k/v
and gate/up, TP sharding), finish (layers that got all their weights were already processed as they completed;
the rest are processed now, and vLLM's kernel repacking, e.g. oneDNN on CPU, runs again). This mirrors what
vLLM's own weight-transfer engines do (`initialize_layerwise_reload` ... `finalize_layerwise_reload`).

Why not `collective_rpc("reload_weights", ...)` per bucket: each such call is a whole session of its own, and
a fused vLLM layer whose parts (say q_proj | k_proj, v_proj) fall into different buckets is finalised with the
missing parts uninitialised. Measured on vLLM 0.32 CPU: buckets of 3 tensors gave NaN logits; the session
below gives log-probs equal to a Hugging Face forward of the new weights.

Memory: a layer's tensors are held by vLLM until the layer has all of them, so push tensors grouped by layer
(the trainer's natural order) to keep at most about one bucket plus one layer alive.

The worker-side functions run inside the engine's worker through `LLM.collective_rpc(fn)`, which needs the
engine core in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, set by `RolloutEngine`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from vapo_megatron.rollout.transports.base import Bucket

if TYPE_CHECKING:
    from vapo_megatron.rollout.vllm_engine import RolloutEngine


class ColocatedTransport:
    """Pushes into a `RolloutEngine` of this process; `engine.weight_version` is set when a push completes.

    With `strict`, a completed push that left any vLLM parameter unset raises (the engine's weights are then
    undefined, and its version is not updated)."""

    def __init__(self, engine: RolloutEngine, *, strict: bool = True) -> None:
        self.engine, self.strict = engine, strict
        self.version: int | None = None
        self.loaded: set[str] = set()

    def begin(self, version: int) -> None:
        self.version, self.loaded = version, set()
        self.engine._rpc(begin_weight_update)

    def push(self, bucket: Bucket) -> None:
        self.loaded |= self.engine._rpc(load_weight_bucket, bucket)

    def finish(self, complete: bool = True) -> None:
        try:
            expected = self.engine._rpc(finish_weight_update)
        finally:
            self.engine.llm.reset_prefix_cache()  # its keys/values came from the old weights
        if not complete:
            return
        missing = sorted(expected - self.loaded)
        if self.strict and missing:
            raise ValueError(f"weight push left {len(missing)} of {len(expected)} vLLM parameters unset, e.g. "
                             f"{missing[:5]}")
        self.engine.weight_version = self.version


# ---- worker side: called as `llm.collective_rpc(fn, args=...)`; `worker` is vLLM's Worker ----------------

def begin_weight_update(worker) -> None:
    """Put every layer of the worker's model into buffered reload mode."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    model = worker.model_runner.get_model()
    initialize_layerwise_reload(model)
    _expect_nothing_from_derived_layers(model)


def _expect_nothing_from_derived_layers(model) -> None:
    """Tell vLLM's reload session that a layer made only of non-persistent buffers gets no weights.

    vLLM (0.32, reload/utils.py `get_layer_size`) counts every parameter and buffer of a layer as loadable,
    non-persistent buffers included, which no checkpoint and no push holds. The rotary embedding is such a layer
    (only `cos_sin_cache`, computed from the config), so `finalize_layerwise_reload` found it had loaded 0 of its
    N elements and warned "RotaryEmbedding: Failed to load weights" on every sync, before restoring its kernel
    tensors (the cache computed at start: the result was right, the message was noise). Setting the layer's
    loadable count to 0 takes the same restore path without the warning (vLLM: "Always place, even when nothing
    is loadable"). A layer with a parameter or a persistent buffer keeps vLLM's count, so a weight really
    missing from a push still warns (and fails the strict check)."""
    from vllm.model_executor.model_loader.reload.layerwise import get_layerwise_info

    for layer in model.modules():
        info = get_layerwise_info(layer)
        derived = getattr(info, "kernel_non_persistent_buffers", None)
        buffers = [name for name, b in layer._buffers.items() if b is not None]
        if (info.can_load() and derived is not None and buffers and set(buffers) <= derived
                and all(p is None for p in layer._parameters.values())):
            info.load_numel_total = 0


def load_weight_bucket(worker, bucket: Bucket) -> set[str]:
    """Feed one bucket of HF-named tensors to the model's loader; returns the vLLM parameter names it set."""
    from vllm.config import set_current_vllm_config

    with set_current_vllm_config(worker.vllm_config):
        return set(worker.model_runner.get_model().load_weights(iter(bucket)))


def finish_weight_update(worker) -> set[str]:
    """Process the layers still pending and restore the kernel tensors; returns the model's parameter names
    (to check that the push was complete)."""
    from vllm.config import set_current_vllm_config
    from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

    from vapo_megatron import platform

    model = worker.model_runner.get_model()
    with set_current_vllm_config(worker.vllm_config):
        finalize_layerwise_reload(model, worker.model_config)
        if not platform.has_cuda():
            from vapo_megatron.platform.cpu import repack_vllm_cpu_moe

            repack_vllm_cpu_moe(model)
    return {name for name, _ in model.named_parameters()}
