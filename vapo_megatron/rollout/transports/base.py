"""The seam between the trainer's weight stream and a rollout engine: one `WeightTransport` per way of moving
bytes (in-process, broadcast over a process group, later CUDA IPC or NCCL to separately placed engines).

One push of one policy version is a session: `begin(version)`, then `push(bucket)` for every bucket of
HF-named whole tensors in the trainer's layer order (`weight_sync.iter_buckets`), then `finish()`. Weights
carry the policy version (an int the caller passes), so that an asynchronous transport can tell the engine
which version it holds and the trainer how stale its rollouts are.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

Bucket = list[tuple[str, torch.Tensor]]
"""HF-named whole tensors, in the trainer's layer order."""


@runtime_checkable
class WeightTransport(Protocol):
    """Moves one policy version's weights, bucket by bucket, into a rollout engine (or several)."""

    def begin(self, version: int) -> None:
        """Open the session for policy `version`."""

    def push(self, bucket: Bucket) -> None:
        """Deliver one bucket. The tensors may be read after `push` returns, until `finish`: the caller keeps
        them alive and unchanged until then (the trainer does: it does not step while weights move)."""

    def finish(self, complete: bool = True) -> None:
        """Close the session. `complete=False` after a failure mid-push: the receiver closes its session
        without recording the version (its weights are then undefined until the next complete push)."""
