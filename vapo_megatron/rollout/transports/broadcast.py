"""The broadcast transport: a trainer export rank sends each bucket over a process group to rollout ranks
(separate placement: the engines live in other processes, maybe other hosts). gloo on CPU, NCCL on GPU.

Every rank of `group` takes part. The source (`src`, a global rank: the trainer rank that holds the whole
HF tensors, e.g. the export rank of `iter_hf_tensors`) drives the session with begin / push / finish; every
other rank calls `receive()`, which replays the session into its own `receiver` transport (typically a
`ColocatedTransport` of its vLLM engine) and returns when the source finishes. Per bucket: one small header
(names, shapes, dtypes, by `broadcast_object_list`), then one `broadcast` per tensor, each received into its
slice of one buffer per bucket, so the sender copies nothing and the receiver allocates once per bucket.

Between the pools of separate placement (two worlds) the group is a `rollout.channel.BridgeChannel` instead of a
torch group: pass it as `channel`, and `src` is then a rank of the bridge (0: the trainer's rank 0); buckets then
travel on the bridge's device (CUDA over NCCL on a GPU machine, CPU over gloo here).
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from vapo_megatron.rollout.transports.base import Bucket, WeightTransport

_ALIGN = 64  # bytes: every tensor of a received bucket starts at a multiple (any dtype's view is aligned)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name.removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in a weight bucket header")
    return dtype


class BroadcastTransport:
    """Sender (on `src`) or receiver (elsewhere) end of a bucketed broadcast over `group`."""

    def __init__(self, group, src: int, receiver: WeightTransport | None = None,
                 device: torch.device | str = "cpu", *, channel=None) -> None:
        self.group, self.src, self.receiver, self.channel = group, src, receiver, channel
        self.device = channel.device if channel is not None else torch.device(device)  # the bridge's weights device
        rank = channel.rank if channel is not None else dist.get_rank()
        self.is_source = rank == src
        if not self.is_source and receiver is None:
            raise ValueError(f"rank {rank} receives from rank {src}: it needs a receiver transport")

    def _header(self, header=None):
        if self.channel is not None:
            return self.channel.broadcast_object(header, self.src, "a weight header")
        box = [header]
        dist.broadcast_object_list(box, src=self.src, group=self.group)
        return box[0]

    def _broadcast(self, tensor: torch.Tensor) -> None:
        if self.channel is not None:
            self.channel.broadcast(tensor, self.src)
        else:
            dist.broadcast(tensor, src=self.src, group=self.group)

    # ---- source side -----------------------------------------------------------------------------------
    def begin(self, version: int) -> None:
        self._check_source()
        self._header(("begin", version))

    def push(self, bucket: Bucket) -> None:
        self._check_source()
        # over the bridge, to its device (no copy where a tensor is already there); over a torch group, as they are
        tensors = [(t if self.channel is None else t.to(self.device)).contiguous() for _, t in bucket]
        self._header(("bucket", [(name, tuple(t.shape), str(t.dtype)) for (name, _), t in zip(bucket, tensors)]))
        for t in tensors:
            self._broadcast(t)

    def finish(self, complete: bool = True) -> None:
        self._check_source()
        self._header(("end", complete))

    def _check_source(self) -> None:
        if not self.is_source:
            raise RuntimeError("begin/push/finish run on the source rank; the others call receive()")

    # ---- receiving side ---------------------------------------------------------------------------------
    def receive(self) -> tuple[int, int, float] | None:
        """Replay one session of the source into `receiver`; returns (version, bytes received, seconds), or
        None when the source closed the session as incomplete."""
        start, nbytes, version = time.perf_counter(), 0, None
        while True:
            kind, payload = self._header()
            if kind == "begin":
                version = payload
                self.receiver.begin(version)
            elif kind == "bucket":
                bucket = self._receive_bucket(payload)
                nbytes += sum(t.numel() * t.element_size() for _, t in bucket)
                self.receiver.push(bucket)
            else:
                self.receiver.finish(complete=payload)
                return (version, nbytes, time.perf_counter() - start) if payload else None

    def _receive_bucket(self, specs: list[tuple[str, tuple[int, ...], str]]) -> Bucket:
        offsets, total = [], 0
        for _, shape, dtype in specs:
            offsets.append(total)
            n = torch.Size(shape).numel() * torch.empty((), dtype=_dtype(dtype)).element_size()
            total += -(-n // _ALIGN) * _ALIGN
        flat = torch.empty((total,), dtype=torch.uint8, device=self.device)
        bucket = []
        for (name, shape, dtype), offset in zip(specs, offsets):
            dt = _dtype(dtype)
            n = torch.Size(shape).numel() * torch.empty((), dtype=dt).element_size()
            t = flat[offset: offset + n].view(dt).view(shape)
            self._broadcast(t)
            bucket.append((name, t))
        return bucket
