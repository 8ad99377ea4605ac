"""The checkpoint checksums' cost (engine/manifest.py) against the save and the load they guard, measured side by
side in one run: each repeat saves a ~1 GB training checkpoint through the trainer's own path
(`engine.checkpoint.save_checkpoint`: megatron-core dist_checkpointing of the policy's model and Adam state, RNG
and trainer state, then the commit step's manifest), verifies it as `--resume` does (`checkpoint_problems`), and
loads it without verification (`load_checkpoint(verify=False)`).

    .venv/bin/python benchmarks/bench_checksum.py [--hidden 1024 --layers 5 --ranks 1 --repeats 3]

"save" = the whole `save_checkpoint`, hashing included; "hash" = the part of it spent in the commit step's
hashing (`manifest.hash_entries`, timed inside the same save); "verify" = `checkpoint_problems` on the saved
checkpoint, warm (its files still in the page cache, as right after a save) and cold (each file fsync'd and
dropped from the page cache with posix_fadvise first: a resume on a fresh node reads from disk); "load" =
`load_checkpoint(verify=False)`, warm and cold. Ratios are hash / (save - hash) and verify / load (warm / warm,
cold / cold: after a cold verify the load finds the files in the page cache), each the best of
`--repeats`. The hash is the one manifest.py picks (BLAKE3 when installed); `--blake2b` also times the
hashlib fallback on the same files.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed


def _evict(ckpt: Path) -> None:
    """Drop the checkpoint's files from the page cache (clean pages only, hence the fsync first)."""
    for f in ckpt.rglob("*"):
        if f.is_file():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _body(hf_dir: str, run_root: str, repeats: int, blake2b: bool) -> dict:
    import torch.distributed as dist

    from vapo_megatron.engine import checkpoint as ckpt
    from vapo_megatron.engine import manifest as mf
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine

    engines = {"policy": build_engine(hf_dir, "policy", RoleLayouts(ParallelConfig(), ParallelConfig(), seed=1))}
    hash_s = [0.0]
    real_hash_entries = mf.hash_entries

    def timed_hash_entries(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return real_hash_entries(*args, **kwargs)
        finally:
            hash_s[0] += time.perf_counter() - t0
    mf.hash_entries = timed_hash_entries  # the save's own hashing, timed where it runs

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    rows: dict[str, list[float]] = {k: [] for k in ("save", "hash", "verify", "verify_cold", "load", "load_cold",
                                                    "blake2b")}
    nbytes = 0
    for r in range(repeats):
        run_dir = f"{run_root}/run{r}"
        hash_s[0] = 0.0
        box: list = []
        rows["save"].append(timed(lambda: box.append(ckpt.save_checkpoint(run_dir, 1, engines, {"step": 1}))))  # noqa: B023
        local_hash = torch.tensor([hash_s[0]], dtype=torch.float64)
        dist.all_reduce(local_hash, op=dist.ReduceOp.MAX)  # the slowest rank's share is what the save waits for
        rows["hash"].append(local_hash.item())
        final = box[0]
        nbytes = sum(f.stat().st_size for f in final.rglob("*") if f.is_file())

        def verify():
            ckpt._VERIFIED.clear()  # noqa: B023 - the cache would skip the second verification
            assert ckpt.checkpoint_problems(final) == []  # noqa: B023
        rows["verify"].append(timed(verify))
        rows["load"].append(timed(lambda: ckpt.load_checkpoint(final, engines, verify=False)))  # noqa: B023
        if dist.get_rank() == 0:
            _evict(final)
        rows["verify_cold"].append(timed(verify))
        if dist.get_rank() == 0:
            _evict(final)
        rows["load_cold"].append(timed(lambda: ckpt.load_checkpoint(final, engines, verify=False)))  # noqa: B023
        if blake2b and dist.get_rank() == 0:
            names = mf.checkpoint_files(final)
            rows["blake2b"].append(timed_local(lambda: real_hash_entries(final, names, "blake2b")))  # noqa: B023
        dist.barrier()
        if dist.get_rank() == 0:
            shutil.rmtree(run_dir)
    return {"rows": rows, "bytes": nbytes, "algorithm": mf.default_algorithm()}


def timed_local(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=5, help="5 layers at hidden 1024: ~1.0 GB with Adam state")
    ap.add_argument("--ranks", type=int, default=1, help="ranks (DP): hashing is split over them")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--blake2b", action="store_true", help="also time the hashlib BLAKE2b fallback")
    ap.add_argument("--dir", default=None, help="where to save (default: a temporary directory)")
    args = ap.parse_args()
    work = tempfile.mkdtemp(dir=args.dir)
    hf_dir = str(save_tiny_hf_model(f"{work}/m", "qwen2", hidden_size=args.hidden, num_heads=args.hidden // 32,
                                    num_kv_heads=args.hidden // 64, intermediate_size=4 * args.hidden,
                                    num_layers=args.layers, vocab_size=4096))
    out = run_distributed(_body, args.ranks, hf_dir, f"{work}/runs", args.repeats, args.blake2b, timeout=3000)[0]
    best = {k: min(v) for k, v in out["rows"].items() if v}
    print(f"checkpoint: {out['bytes'] / 1e9:.2f} GB (hidden {args.hidden}, {args.layers} layers, fp32 weights + "
          f"Adam moments), {args.ranks} rank(s), {os.cpu_count()} cpus, hash {out['algorithm']}, best of "
          f"{args.repeats}", flush=True)
    save_only = best["save"] - best["hash"]
    print(f"{'save (incl. hash)':>22s} {best['save']:7.2f} s")
    print(f"{'hash, inside the save':>22s} {best['hash']:7.2f} s  {best['hash'] / save_only:5.2f}x the save without "
          f"it ({best['hash'] / best['save']:.0%} of the save), {out['bytes'] / best['hash'] / 1e9:.2f} GB/s")
    print(f"{'load (no verify)':>22s} {best['load']:7.2f} s")
    print(f"{'verify, warm':>22s} {best['verify']:7.2f} s  {best['verify'] / best['load']:5.2f}x the load")
    print(f"{'load cold (no verify)':>22s} {best['load_cold']:7.2f} s")
    print(f"{'verify, cold':>22s} {best['verify_cold']:7.2f} s  {best['verify_cold'] / best['load_cold']:5.2f}x the "
          f"cold load (the load after it reads from the page cache)")
    if "blake2b" in best:
        print(f"{'blake2b fallback hash':>22s} {best['blake2b']:7.2f} s  {best['blake2b'] / save_only:5.2f}x the "
              f"save without hashing")


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
