"""A transport that keeps what it is pushed: `weights` (name -> tensor) of the last complete push, and its
`version`. The receiving end for tests of other transports, and for callers that want the HF state dict."""
from __future__ import annotations

import torch

from vapo_megatron.rollout.transports.base import Bucket


class MemoryTransport:
    """Collects pushed tensors (cloned, so they outlive the sender's buffers) into `weights`."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.version: int | None = None
        self._pending: dict[str, torch.Tensor] = {}
        self._session: int | None = None

    def begin(self, version: int) -> None:
        self._session, self._pending = version, {}

    def push(self, bucket: Bucket) -> None:
        for name, tensor in bucket:
            if name in self._pending:
                raise ValueError(f"{name} pushed twice in one session")
            self._pending[name] = tensor.clone()

    def finish(self, complete: bool = True) -> None:
        if complete:
            self.weights, self.version = self._pending, self._session
        self._pending, self._session = {}, None
