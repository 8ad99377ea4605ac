"""Full Megatron -> vLLM weight sync time against a plain copy of the same state dict, measured side by side in
one run (each repeat: sync, then copy, in the same processes), at trainer TP=1 and TP=2, for several bucket
sizes; then the broadcast transport (trainer rank 0 -> a rollout engine on rank 1).

    .venv/bin/python benchmarks/bench_weight_sync.py [--hidden 1024 --layers 8] [--phases]

"sync" = gather TP shards into whole tensors + HF layout + bucketed push into the live vLLM engine +
prefix-cache reset (`RolloutEngine.update_weights(iter_hf_tensors(...))`, what the trainer calls).
"clone" = `{k: v.clone()}` of the same HF state dict: moving the bytes once into fresh memory, the floor the
issue measured against. "copy_" = `dst.copy_(src)` into tensors allocated once: the same without the page
faults of fresh memory (how much of "clone" the allocator's state decides varies 1x-4x from run to run on
this machine). Ratios are sync / clone and sync / copy_, each the best of `--repeats`. `--phases` adds the
trainer side alone (`export`: the HF tensors made and dropped) and the engine side alone (`push`: tensors
gathered beforehand) at the largest bucket. Target (issue 24): sync <= 3x clone at 0.5 GB and more.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

BUCKETS_MB = (1, 16, 256)


def _best(fn, repeats: int) -> float:
    import torch.distributed as dist

    times = []
    for _ in range(repeats):
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    return min(times)


def _copies(hf: dict[str, torch.Tensor], repeats: int) -> tuple[float, float]:
    dst = {k: torch.empty_like(v) for k, v in hf.items()}

    def clone():
        _ = {k: v.clone() for k, v in hf.items()}

    def copy():
        for k, v in hf.items():
            dst[k].copy_(v)
    return _best(clone, repeats), _best(copy, repeats)


def _setup(hf_dir: str, tp: int):
    from safetensors.torch import load_file

    from vapo_megatron.engine.build import build_model
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.parallel.layout import ParallelConfig, initialize
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    engine = RolloutEngine(hf_dir, tensor_parallel_size=1, seed=0, max_model_len=64)
    parallel = ParallelConfig(tp=tp)
    initialize(parallel)
    arch = load_arch(hf_dir)
    hf = load_file(f"{hf_dir}/model.safetensors")
    return engine, arch, hf, build_model(arch, parallel, "policy", hf_get=hf.__getitem__, ddp=False).model


def _body(hf_dir: str, tp: int, repeats: int, phases: bool, buckets: list[int]):
    from vapo_megatron.engine.export import iter_hf_tensors

    engine, arch, hf, model = _setup(hf_dir, tp)
    rows, stats = [], None

    def sync(bucket):
        nonlocal stats
        stats = engine.update_weights(iter_hf_tensors(model, arch), bucket_bytes=bucket)
    for bucket in buckets:
        sync_s = _best(lambda: sync(bucket), repeats)  # noqa: B023 - used at once
        rows.append((f"sync {bucket >> 20}M", stats.buckets, stats.bytes, sync_s, *_copies(hf, repeats)))
    if phases:
        def export():
            for _ in iter_hf_tensors(model, arch):
                pass
        rows.append(("export", 0, stats.bytes, _best(export, repeats), *_copies(hf, repeats)))
        gathered = [(k, v.clone()) for k, v in iter_hf_tensors(model, arch)]
        push_s = _best(lambda: engine.update_weights(iter(gathered), bucket_bytes=buckets[-1]), repeats)
        rows.append(("push", stats.buckets, stats.bytes, push_s, *_copies(hf, repeats)))
    engine.shutdown()
    return rows


def _broadcast_body(hf_dir: str, repeats: int, bucket: int):
    import torch.distributed as dist

    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.rollout.transports.broadcast import BroadcastTransport
    from vapo_megatron.rollout.transports.colocated import ColocatedTransport
    from vapo_megatron.rollout.weight_sync import push_weights

    engine, arch, hf, model = _setup(hf_dir, 1)  # trainer TP=1 on each rank: rank 0's model is the source
    transport = BroadcastTransport(dist.group.WORLD, src=0, receiver=ColocatedTransport(engine))
    version, nbuckets = 0, [0]

    def send():
        nonlocal version
        version += 1
        if dist.get_rank() == 0:
            nbuckets[0] = push_weights(transport, iter_hf_tensors(model, arch), bucket, version=version).buckets
        else:
            transport.receive()
    seconds = _best(send, repeats)
    dist.broadcast_object_list(nbuckets, src=0)
    rows = [(f"broadcast {bucket >> 20}M", nbuckets[0], sum(t.numel() * t.element_size() for t in hf.values()), seconds,
             *_copies(hf, repeats))]
    engine.shutdown()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--phases", action="store_true", help="also time the trainer side and the engine side alone")
    ap.add_argument("--no-broadcast", action="store_true")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="trainer TP sizes to run")
    ap.add_argument("--buckets", type=int, nargs="+", default=list(BUCKETS_MB), help="bucket sizes, MB")
    args = ap.parse_args()
    buckets = [mb << 20 for mb in args.buckets]
    hf_dir = str(save_tiny_hf_model(tempfile.mkdtemp() + "/m", "qwen2", hidden_size=args.hidden,
                                    num_heads=args.hidden // 32, num_kv_heads=args.hidden // 64,
                                    intermediate_size=4 * args.hidden, num_layers=args.layers, vocab_size=4096))
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab 4096 (fp32)", flush=True)
    runs = [(tp, _body, (hf_dir, tp, args.repeats, args.phases, buckets)) for tp in args.tp]
    if not args.no_broadcast:
        runs.append((1, _broadcast_body, (hf_dir, args.repeats, buckets[-1])))
    lines = [f"{'trainer TP':>10s} {'what':>15s} {'buckets':>8s} {'MB':>7s} {'s':>7s} {'clone s':>8s} "
             f"{'copy_ s':>8s} {'/clone':>7s} {'/copy_':>7s}"]
    for tp, body, body_args in runs:
        for what, nbuckets, nbytes, seconds, clone_s, copy_s in run_distributed(body, 2 if body is
                                                                                _broadcast_body else tp,
                                                                                *body_args, timeout=900)[-1]:
            lines.append(f"{tp:10d} {what:>15s} {nbuckets:8d} {nbytes / 1e6:7.1f} {seconds:7.3f} {clone_s:8.4f} "
                         f"{copy_s:8.4f} {seconds / clone_s:6.1f}x {seconds / copy_s:6.1f}x")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
