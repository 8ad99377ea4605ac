"""Driving a weight push: the trainer's stream of HF-named whole tensors, cut into buckets, through a
`WeightTransport` (rollout/transports/) for one policy version.

    stats = push_weights(ColocatedTransport(engine), actor.iter_hf_tensors(), bucket_bytes, version=step)

`RolloutEngine.update_weights` is this with the colocated transport. Where the time goes, and what was tried,
is in docs/weight_sync.md.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch

from vapo_megatron.rollout.transports.base import Bucket, WeightTransport

DEFAULT_BUCKET_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class WeightUpdateStats:
    """What one push moved."""

    bytes: int
    """Bytes of tensor data pushed."""
    tensors: int
    """Number of named tensors pushed."""
    buckets: int
    """Number of buckets (RPCs, broadcasts) that carried tensors."""
    seconds: float
    """Wall time of the whole push, the receiver's finishing (prefix-cache reset) included."""
    version: int
    """The policy version pushed."""


def iter_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[Bucket]:
    """Group a stream of (name, tensor) into lists of about `bucket_bytes`, consuming the stream lazily.

    A bucket is flushed as soon as it reaches `bucket_bytes`; a single tensor larger than that is a bucket of
    its own. Order is preserved."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes={bucket_bytes} must be positive")
    bucket: Bucket = []
    size = 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor.detach()))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def push_weights(transport: WeightTransport, named_tensors: Iterable[tuple[str, torch.Tensor]],
                 bucket_bytes: int = DEFAULT_BUCKET_BYTES, *, version: int) -> WeightUpdateStats:
    """One session of `transport` for policy `version`: begin, every bucket of the (lazily consumed) stream,
    finish. If the stream or a push fails, the session is closed as incomplete and the error re-raised."""
    start = time.perf_counter()
    nbytes = ntensors = nbuckets = 0
    transport.begin(version)
    try:
        for bucket in iter_buckets(named_tensors, bucket_bytes):
            transport.push(bucket)
            nbuckets += 1
            ntensors += len(bucket)
            nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
    except BaseException:
        transport.finish(complete=False)
        raise
    transport.finish()
    return WeightUpdateStats(bytes=nbytes, tensors=ntensors, buckets=nbuckets,
                             seconds=time.perf_counter() - start, version=version)
