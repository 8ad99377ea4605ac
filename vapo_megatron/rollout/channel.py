"""`BridgeChannel`: the process group between the two pools of separate placement (trainer rank 0 and every
rollout rank), with the operations the rollout protocol needs and errors that name the peer.

Why not `torch.distributed.new_group`: each pool has its own default process group (megatron-core and vLLM both
build their groups on "the world", so each pool must be a world of its own: rollout/placement.py), and a group of
another world cannot be made with `new_group`. The bridge is a `ProcessGroupGloo` built directly on the shared
store, used through its own methods (`broadcast`, `send`, `recv`). Control messages and samples (small, pickled)
always go over gloo. Weights go over the bridge's `device`: gloo on CPU; on a CUDA machine a `ProcessGroupNCCL`
built the same way on the same store (`tensor_pg`), so a bucket moves GPU to GPU. The NCCL path has not run yet
(no GPU was lent; docs/async.md): its hang detection is NCCL's own watchdog (`rollout.rollout_timeout_s` as the
operation timeout), which aborts the process rather than raising `RolloutRankError`.

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


def tensor_backend(cuda: bool) -> str:
    """The bridge's backend for weights: NCCL where CUDA is (and torch was built with NCCL), else gloo."""
    return "nccl" if cuda and dist.is_nccl_available() else "gloo"


class BridgeChannel:
    """`rank` / `size` in the bridge (rank 0: the trainer's rank 0; 1..size-1: the rollout ranks)."""

    def __init__(self, store, rank: int, size: int, timeout_s: float, names: list[str]) -> None:
        self.rank, self.size, self.timeout_s, self.names = rank, size, timeout_s, names
        timeout = datetime.timedelta(seconds=timeout_s)
        self.pg = dist.ProcessGroupGloo(dist.PrefixStore("vapo_bridge", store), rank, size, timeout)
        self.tensor_pg, self.device = self.pg, torch.device("cpu")
        if tensor_backend(torch.cuda.is_available()) == "nccl" and not self._gpus_shared():
            options = dist.ProcessGroupNCCL.Options()
            options._timeout = timeout
            self.tensor_pg = dist.ProcessGroupNCCL(dist.PrefixStore("vapo_bridge_nccl", store), rank, size, options)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _gpus_shared(self) -> bool:
        """Whether two bridge ranks drive the same GPU (one host, both pools on one device: NCCL refuses a
        communicator with a GPU twice), by an all-gather of (host, device) over gloo. Then weights stay on gloo."""
        import socket
        import zlib

        me = torch.tensor([zlib.crc32(socket.gethostname().encode()), torch.cuda.current_device()])
        everyone = [torch.zeros_like(me) for _ in range(self.size)]
        self._wait(self.pg.allgather([everyone], [me]), "the bridge's device list", 1 if self.rank == 0 else 0)
        return len({tuple(t.tolist()) for t in everyone}) < self.size

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
        """`tensor` from `src` to every bridge rank, in place: over gloo for a CPU tensor, over `tensor_pg` for
        one on the bridge's CUDA device (weights: `BroadcastTransport` puts them there)."""
        if tensor.device.type == "cpu":
            pg = self.pg
        elif tensor.device == self.device:
            pg = self.tensor_pg
        else:
            raise ValueError(f"a tensor on {tensor.device} cannot cross this bridge (weights on {self.device}, "
                             "messages on cpu)")
        self._wait(pg.broadcast(tensor, src), what, src if src != self.rank else (1 if self.rank == 0 else 0))

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
