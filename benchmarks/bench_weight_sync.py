"""Full Megatron -> vLLM weight sync time against a plain copy of the same state dict in one process,
measured side by side in one run, at trainer TP=1 and TP=2, for several bucket sizes.

    .venv/bin/python benchmarks/bench_weight_sync.py [--hidden 256 --layers 4]

"sync" = gather TP/PP shards into whole tensors + HF layout + bucketed push into the live vLLM engine +
prefix-cache reset. "copy" = `{k: v.clone()}` of the same HF state dict (the floor for moving the bytes once).
Target (CPU, TP=1): sync <= 3x copy... on models where bytes dominate; on tiny models fixed per-RPC costs do.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

BUCKETS = (1 << 20, 16 << 20, 256 << 20)


def _body(hf_dir: str, tp: int, repeats: int):
    import torch.distributed as dist
    from safetensors.torch import load_file

    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import ParallelConfig, initialize
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    engine = RolloutEngine(hf_dir, tensor_parallel_size=1, seed=0, max_model_len=64)
    parallel = ParallelConfig(tp=tp)
    initialize(parallel)
    arch = load_arch(hf_dir)
    hf = load_file(f"{hf_dir}/model.safetensors")
    built = build_model(arch, parallel, "policy", hf_get=hf.__getitem__, ddp=False)
    rows = []
    for bucket in BUCKETS:
        times = []
        for _ in range(repeats):
            dist.barrier()
            t0 = time.perf_counter()
            stats = engine.update_weights(iter_hf_tensors(built.model, arch), bucket_bytes=bucket)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        rows.append((bucket, min(times), stats.buckets, stats.bytes))
    copies = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _ = {k: v.clone() for k, v in hf.items()}
        copies.append(time.perf_counter() - t0)
    engine.shutdown()
    return rows, min(copies)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hf_dir = str(save_tiny_hf_model(tempfile.mkdtemp() + "/m", "qwen2", hidden_size=args.hidden,
                                    num_heads=args.hidden // 32, num_kv_heads=args.hidden // 64,
                                    intermediate_size=4 * args.hidden, num_layers=args.layers, vocab_size=4096))
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab 4096 (fp32)")
    print(f"{'trainer TP':>10s} {'bucket':>8s} {'buckets':>8s} {'MB':>7s} {'sync s':>8s} {'copy s':>8s} {'ratio':>7s}")
    for tp in (1, 2):
        rows, copy_s = run_distributed(_body, tp, hf_dir, tp, args.repeats, timeout=900)[0]
        for bucket, sync_s, nbuckets, nbytes in rows:
            print(f"{tp:10d} {bucket >> 20:7d}M {nbuckets:8d} {nbytes / 1e6:7.1f} {sync_s:8.3f} {copy_s:8.4f} "
                  f"{sync_s / copy_s:6.1f}x", flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
