"""Peak extra memory and time of vocab-parallel log-prob + entropy (forward and backward) relative to the
logits shard, beside the naive `log_softmax` formulation, measured side by side in one run.

Memory is counted exactly by a dispatch mode that tracks the bytes of every live tensor storage created during
the call (CPU torch has no allocator statistics). Target: peak extra <= 2x the logits shard (forward).
    .venv/bin/python benchmarks/bench_vocab_parallel.py [--tokens 4096 --vocab-shard 16384]
"""
from __future__ import annotations

import argparse
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from vapo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy


class LiveBytes(TorchDispatchMode):
    """Tracks the current and peak bytes of storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _track(self, t):
        if not isinstance(t, torch.Tensor):
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in self._seen or storage.nbytes() == 0:
            return
        self._seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._release, key, storage.nbytes())

    def _release(self, key, nbytes):
        self._seen.discard(key)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            self._track(t)
        return out


def naive(logits, targets):
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), -(logp.exp() * logp).sum(-1)


def ours(logits, targets):
    return vocab_parallel_logprobs_entropy(logits, targets)


def measure(fn, logits, targets, backward: bool):
    x = logits.detach().clone().requires_grad_(backward)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(targets.shape, generator=g)
    with LiveBytes() as mem:
        t0 = time.perf_counter()
        lp, ent = fn(x, targets)
        if backward:
            (w * lp + w * ent).sum().backward()
        dt = time.perf_counter() - t0
    return mem.peak, dt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--vocab-shard", type=int, default=16384)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.tokens, args.vocab_shard, generator=g)
    targets = torch.randint(0, args.vocab_shard, (args.tokens,), generator=g)
    shard = logits.numel() * logits.element_size()
    print(f"logits shard: {args.tokens} tokens x {args.vocab_shard} vocab, fp32 = {shard / 2**20:.1f} MiB")
    print(f"{'':28s} {'peak extra / shard':>18s} {'seconds':>8s}")
    for name, fn in (("vocab-parallel (ours)", ours), ("naive log_softmax", naive)):
        for backward in (False, True):
            measure(fn, logits, targets, backward)  # warm-up
            peak, dt = measure(fn, logits, targets, backward)
            label = f"{name} {'fwd+bwd' if backward else 'fwd'}"
            print(f"{label:28s} {peak / shard:18.2f} {dt:8.3f}")


if __name__ == "__main__":
    main()
