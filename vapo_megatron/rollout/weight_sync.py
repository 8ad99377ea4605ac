"""Moving trainer weights into a live vLLM engine: buckets on the trainer side, a reload session on the worker.

A push is one *session*: begin (every vLLM layer is set up to buffer incoming checkpoint-format weights),
one RPC per bucket (`model.load_weights(bucket)`: HF names, vLLM's own name mapping, fusing of q/k/v and
gate/up, TP sharding), finish (layers that got all their weights were already processed as they completed;
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

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class WeightUpdateStats:
    """What one `RolloutEngine.update_weights` call moved."""

    bytes: int
    """Bytes of tensor data pushed."""
    tensors: int
    """Number of named tensors pushed."""
    buckets: int
    """Number of RPCs that carried tensors."""
    seconds: float
    """Wall time of the whole push, prefix-cache reset included."""


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
                 ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Group a stream of (name, tensor) into lists of about `bucket_bytes`, consuming the stream lazily.

    A bucket is flushed as soon as it reaches `bucket_bytes`; a single tensor larger than that is a bucket of
    its own. Order is preserved."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


# ---- worker side: called as `llm.collective_rpc(fn, args=...)`; `worker` is vLLM's Worker ----------------

def begin_weight_update(worker) -> None:
    """Put every layer of the worker's model into buffered reload mode."""
    from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

    initialize_layerwise_reload(worker.model_runner.get_model())


def load_weight_bucket(worker, bucket: list[tuple[str, torch.Tensor]]) -> set[str]:
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
