"""Packed (THD) against padded micro-batches: one actor and one critic train step on a mixed-length batch, side
by side in one run, with the padding waste and peak memory of each path.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_packing.py [--rows 32] [--budget 4096] [--repeats 2]

The batch: `--rows` rows, prompts of 10-200 tokens (uniform), responses log-normal between 30 and 1,500 tokens
(median about 250), the mixture the VAPO paper trains on, scaled down. The model: a tiny Qwen2-shaped model
(hidden 128, 4 layers, 4 heads, GQA 2 KV heads) built here, one process (TP = PP = CP = 1).

Paths, all with the same token budget (`train.micro_batch_tokens`):
- padded: rows sorted by length, each micro-batch padded to its own longest row (the best padded path);
- packed: rows packed into one stream per micro-batch with cumulative sequence lengths (`train.pack_sequences`).
With `--fixed-rows N` the fixed-row padded path (N rows per micro-batch, padded to the batch's longest row, the
default when train.micro_batch_tokens is 0) is timed as well (slow: about 12x the packed step).
Each step is timed `--repeats` times after one warm-up, paths alternating; the
minimum is kept (least disturbed by other load). Peak memory: the rise of the process's resident set during the
step (CPU, sampled every 10 ms) or `torch.cuda.max_memory_allocated` (GPU). Seconds are CPU seconds of the
process on CPU (see `clock`), wall seconds on GPU.

The last line is `packed/padded tokens per second: N.NNx` (real tokens per second, packed over padded, actor and
critic steps together).

What the ratio is made of, on CPU (measured on the 2-core machine, defaults): packed 3.4-3.6x padded, peak memory
about 270 MiB against 650-800 MiB. The padded path loses 17 % of its tokens to padding, but most of the gap is the
attention kernel: the padded path runs megatron-core's local DotProductAttention (baddbmm, masked softmax, bmm:
the [rows x heads, S, S] scores are materialised), the packed path torch's fused causal kernel per sequence
(models/thd_attention.py). With the padded path's attention swapped for the same fused kernel (a diagnostic, not
a code path of the package), packed is 1.14-1.15x padded: what packing alone gains here. On GPU both paths run
TransformerEngine's fused attention, so expect the smaller number there (plus the saved padding).
"""
from __future__ import annotations

import argparse
import tempfile
import threading
import time

import torch

VOCAB = 128


def response_lengths(n: int, seed: int, lo: int = 30, hi: int = 1500) -> list[int]:
    """Log-normal response lengths (median about 250 tokens), clamped into [lo, hi]."""
    g = torch.Generator().manual_seed(seed)
    raw = torch.exp(torch.randn(n, generator=g) * 0.9 + 5.5)
    return [int(x) for x in raw.clamp(lo, hi).round()]


class PeakMemory:
    """Peak memory of a block: CUDA's allocator peak, or the resident set sampled in a thread on CPU."""

    def __enter__(self):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
            return self
        import psutil

        self.proc, self.stop = psutil.Process(), threading.Event()
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.01):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.rise = torch.cuda.max_memory_allocated() - self.start
        else:
            self.stop.set()
            self.thread.join()
            self.rise = self.peak - self.start


def release_freed_memory() -> None:
    """Hand memory freed by earlier steps back to the OS (glibc keeps it otherwise), so that the resident-set
    rise of the next step is that step's own."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:  # not glibc: the rise may then be understated
        pass


def clock() -> float:
    """GPU: wall time. CPU: this process's CPU time, which other load on a shared machine disturbs far less than
    wall time (the step runs on one thread with OMP_NUM_THREADS=1; the memory sampler adds well under 1 %)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        return time.perf_counter()
    return time.process_time()


def time_step(engine, batch, loss_fn) -> tuple[float, float, float]:
    """(seconds, peak memory rise in MiB, padding waste) of one train step."""
    release_freed_memory()
    with PeakMemory() as mem:
        t0 = clock()
        metrics = engine.train_step(batch, loss_fn)
        seconds = clock() - t0
    return seconds, mem.rise / 2 ** 20, metrics[f"{engine.role}/padding_waste"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--budget", type=int, default=4096, help="train.micro_batch_tokens of every path")
    ap.add_argument("--fixed-rows", type=int, default=0,
                    help="also time the fixed padded path with this many rows per micro-batch (slow: 0 skips it)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, critic_objective, minibatch_counts
    from vapo_megatron.models.tiny import save_tiny_hf_model
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts, init_distributed
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    init_distributed()
    hf_dir = str(save_tiny_hf_model(tempfile.mkdtemp(prefix="bench_packing_"), "qwen2", seed=1,
                                    max_position_embeddings=2048))
    lengths = response_lengths(args.rows, args.seed)
    batch = synthetic_rl_batch(args.rows, VOCAB, seed=args.seed, prompt_len=(10, 200), lengths=lengths)
    real = int(batch.seq_lens.sum())
    print(f"batch: {args.rows} rows, {real} real tokens, sequence lengths {int(batch.seq_lens.min())}-"
          f"{int(batch.seq_lens.max())} (median {int(batch.seq_lens.median())}), token budget {args.budget}")

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    alg, counts = AlgorithmConfig(), minibatch_counts(batch)
    paths = {"padded": dict(pack_sequences=False, micro_batch_tokens=args.budget),
             "packed": dict(pack_sequences=True, micro_batch_tokens=args.budget)}
    if args.fixed_rows:
        paths["padded fixed rows"] = dict(pack_sequences=False, micro_batch_size=args.fixed_rows)
    engines = {(path, role): build_engine(hf_dir, role, layouts, lr=1e-6, **kw)
               for path, kw in paths.items() for role in ("policy", "critic")}
    loss = {"policy": actor_objective(alg, counts, VOCAB), "critic": critic_objective(alg, counts)}
    best: dict[tuple[str, str], tuple[float, float, float]] = {}
    for repeat in range(args.repeats + 1):  # the first round warms up
        for (path, role), engine in engines.items():
            with layouts.use(role):
                result = time_step(engine, batch, loss[role])
            if repeat and ((path, role) not in best or result[0] < best[(path, role)][0]):
                best[(path, role)] = result

    print(f"{'path':18s} {'role':7s} {'step s':>8s} {'tokens/s':>9s} {'padding waste':>14s} {'peak MiB':>9s}")
    for (path, role), (sec, mib, waste) in best.items():
        print(f"{path:18s} {role:7s} {sec:8.2f} {real / sec:9.0f} {waste:14.3f} {mib:9.0f}")
    total = {p: sum(best[(p, r)][0] for r in ("policy", "critic")) for p in paths}
    if args.fixed_rows:
        print(f"packed / padded fixed rows tokens per second: {total['padded fixed rows'] / total['packed']:.2f}x")
    print(f"packed/padded tokens per second: {total['padded'] / total['packed']:.2f}x")


if __name__ == "__main__":
    main()
