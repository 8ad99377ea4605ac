"""Vectorised GAE against a per-token loop and against a plain copy of the same bytes, measured side by side.

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_gae.py`` (defaults B=256, T=8192, per-sequence lambdas, about a
minute on CPU). Baselines:

- loop: the usual per-token implementation, ``for t in reversed(range(T))`` over ``[B]`` columns, timed on the last
  ``--loop-tokens`` positions and extrapolated linearly to ``T`` (each step costs the same).
- python loop: the per-token, per-sequence float loop of the unit tests, timed on a few rows and extrapolated.
- copy: the memory traffic GAE cannot avoid, read rewards, values and mask (clone) and write two ``[B, T]`` outputs.

Targets: vectorised at least 20x faster than the loop and within 5x of the copy. Other benchmark sections (e.g.
vocab-parallel memory) belong in their own functions called from ``main``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from vapo_megatron.algorithms import gae, length_adaptive_lambda


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Minimum wall time in seconds over ``repeats`` runs after one warm-up (least disturbed by other load)."""

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def make_inputs(batch: int, length: int, device: torch.device, seed: int = 0):
    """Sparse final rewards, random values, right-padded float32 mask, length-adaptive per-sequence lambdas."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(length // 4, length + 1, (batch,), generator=gen)
    mask = (torch.arange(length)[None, :] < lengths[:, None]).float()
    rewards = torch.zeros(batch, length)
    rewards[torch.arange(batch), lengths - 1] = torch.randint(0, 2, (batch,), generator=gen).float()
    values = torch.rand(batch, length, generator=gen)
    lam = length_adaptive_lambda(lengths, alpha=0.05)
    return rewards.to(device), values.to(device), mask.to(device), lam.to(device)


def loop_gae(rewards, values, mask, gamma: float, lam: torch.Tensor, start: int = 0):
    """Per-token reverse loop over positions ``start..T-1`` (vectorised over the batch only)."""
    batch, length = rewards.shape
    adv = torch.zeros_like(rewards)
    next_adv = torch.zeros(batch, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(next_adv)
    for t in reversed(range(start, length)):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        next_value = values[:, t] * mask[:, t]
        adv[:, t] = next_adv
    return adv, adv + values * mask


def python_loop_gae_rows(rewards, values, mask, gamma: float, lam, rows: int, tokens: int) -> None:
    """The unit tests' per-sequence float loop on ``rows`` rows x the last ``tokens`` positions."""
    for b in range(rows):
        r, v, m = rewards[b, -tokens:].tolist(), values[b, -tokens:].tolist(), mask[b, -tokens:].tolist()
        acc, next_v, out, d = 0.0, 0.0, [0.0] * tokens, gamma * float(lam[b])
        for t in reversed(range(tokens)):
            acc = (r[t] + gamma * next_v - v[t] + d * acc) * m[t]
            next_v = v[t] * m[t]
            out[t] = acc


def copy_same_bytes(rewards, values, mask) -> None:
    r, v, m = rewards.clone(), values.clone(), mask.clone()
    torch.empty_like(r).copy_(r)
    torch.empty_like(v).copy_(m)


def report_gae(args: argparse.Namespace, device: torch.device) -> None:
    rewards, values, mask, lam = make_inputs(args.batch, args.length, device)
    t_vec = timed(lambda: gae(rewards, values, mask, 1.0, lam), device, args.repeats)
    t_copy = timed(lambda: copy_same_bytes(rewards, values, mask), device, args.repeats)
    loop_tokens = min(args.loop_tokens, args.length)
    t_loop_part = timed(lambda: loop_gae(rewards, values, mask, 1.0, lam, args.length - loop_tokens), device, 2)
    t_loop = t_loop_part * args.length / loop_tokens
    py_rows, py_tokens = min(4, args.batch), min(2048, args.length)
    t_py_part = timed(lambda: python_loop_gae_rows(rewards, values, mask, 1.0, lam, py_rows, py_tokens), device, 1)
    t_py = t_py_part * (args.batch / py_rows) * (args.length / py_tokens)

    adv, _ = gae(rewards, values, mask, 1.0, lam)
    ref_adv, _ = loop_gae(rewards, values, mask, 1.0, lam, args.length - loop_tokens)
    tail = slice(args.length - loop_tokens, None)
    err = (adv[:, tail] - ref_adv[:, tail]).abs().max().item()  # the tail's advantages depend on the tail only

    print(f"GAE B={args.batch} T={args.length} per-sequence lambda, {device}, torch threads {torch.get_num_threads()}")
    print(f"  vectorised gae          {t_vec * 1e3:9.1f} ms")
    print(f"  copy of same bytes      {t_copy * 1e3:9.1f} ms   gae / copy   = {t_vec / t_copy:6.2f}x  (target <= 5)")
    print(
        f"  per-token loop          {t_loop * 1e3:9.1f} ms   loop / gae   = {t_loop / t_vec:6.1f}x  (target >= 20; "
        f"timed on the last {loop_tokens} of {args.length} tokens, extrapolated)"
    )
    print(
        f"  python float loop       {t_py * 1e3:9.1f} ms   python / gae = {t_py / t_vec:6.0f}x  "
        f"(timed on {py_rows} rows x {py_tokens} tokens, extrapolated)"
    )
    print(f"  max |gae - loop| on the timed tail: {err:.2e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--loop-tokens", type=int, default=1024, help="positions the per-token loop is timed on")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    report_gae(args, torch.device(args.device))


if __name__ == "__main__":
    main()
