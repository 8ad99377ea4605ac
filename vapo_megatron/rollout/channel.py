"""`BridgeChannel`: the process group between the two pools of separate placement (trainer rank 0 and every
rollout rank), with the operations the rollout protocol needs and errors that name the peer.

Why not `torch.distributed.new_group`: each pool has its own default process group (megatron-core and vLLM both
build their groups on "the world", so each pool must be a world of its own: rollout/placement.py), and a group of
another world cannot be made with `new_group`. The bridge is a `ProcessGroupGloo` built directly on the shared
store, used through its own methods (`broadcast`, `send`, `recv`). gloo on CPU; on GPU the weights would want a
`ProcessGroupNCCL` built the same way (not done here, docs/async.md).

Every wait is bounded by the group's timeout (`rollout.rollout_timeout_s`); a peer that died closes its sockets,
which gloo reports at once. Either way a `RolloutRankError` naming what was awaited is raised.
"""
from __future__ import annotations

import datetime
import pickle

import torch
import torch.distributed as dist

from vapo_megatron.errors import RolloutRankError

_TAG = 7


class BridgeChannel:
    """`rank` / `size` in the bridge (rank 0: the trainer's rank 0; 1..size-1: the rollout ranks)."""

    def __init__(self, store, rank: int, size: int, timeout_s: float, names: list[str]) -> None:
        self.rank, self.size, self.timeout_s, self.names = rank, size, timeout_s, names
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("vapo_bridge", store), rank, size,
                                        datetime.timedelta(seconds=timeout_s))

    def _wait(self, work, what: str, peer: int) -> None:
        try:
            work.wait()
        except RuntimeError as e:
            lost = any(w in str(e).lower() for w in ("closed", "reset", "crash", "broken pipe"))
            kind = "closed the connection (it died?)" if lost else \
                f"did not answer within rollout.rollout_timeout_s={self.timeout_s:g} s (hung?)"
            raise RolloutRankError(f"{self.names[peer]} {kind} while this rank waited for {what}; stopping the "
                                   f"run ({str(e).splitlines()[0][:160]})") from None

    def broadcast(self, tensor: torch.Tensor, src: int, what: str = "a weight bucket") -> None:
        self._wait(self.pg.broadcast(tensor, src), what, src if src != self.rank else (1 if self.rank == 0 else 0))

    def broadcast_object(self, obj=None, src: int = 0, what: str = "a message"):
        """`obj` from `src` to every bridge rank (pickled: small control messages and headers)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8) if self.rank == src else None
        size = torch.tensor([payload.numel() if payload is not None else 0], dtype=torch.long)
        self.broadcast(size, src, what)
        if payload is None:
            payload = torch.empty(int(size), dtype=torch.uint8)
        self.broadcast(payload, src, what)
        return obj if self.rank == src else pickle.loads(payload.numpy().tobytes())

    def send_object(self, obj, dst: int, what: str = "samples") -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        self._wait(self.pg.send([torch.tensor([payload.numel()], dtype=torch.long)], dst, _TAG), what, dst)
        self._wait(self.pg.send([payload], dst, _TAG), what, dst)

    def recv_object(self, src: int, what: str = "samples"):
        size = torch.zeros(1, dtype=torch.long)
        self._wait(self.pg.recv([size], src, _TAG), what, src)
        payload = torch.empty(int(size), dtype=torch.uint8)
        self._wait(self.pg.recv([payload], src, _TAG), what, src)
        return pickle.loads(payload.numpy().tobytes())
