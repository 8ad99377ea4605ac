"""Where the CPU weight sync's time above a copy goes (issue 24, item 6): vLLM's CPU linear layers, dispatched as
vLLM does (oneDNN: a packed copy of every weight, rebuilt on every reload) against plain `torch.nn.functional.linear`
on the weights as loaded (`vllm._custom_ops._supports_onednn = False` before the engine is built, so vLLM's own
fallback in `dispatch_cpu_unquantized_gemm` is taken). Same model, same process layout, side by side in one run,
alternating the two (A B A B) so that drift of a shared machine shows:

    .venv/bin/python benchmarks/bench_cpu_gemm.py [--hidden 1024 --layers 8 --tokens 48 --prompts 16]

Per run: a full colocated sync at 256 MB buckets (`RolloutEngine.update_weights(iter_hf_tensors(...))`, best of
3) against `clone` and `copy_` of the same state dict (bench_weight_sync.py's floors), and one generation of
`--prompts` x `--tokens` tokens after a warm-up. The first log-probs of the generation are printed: the two
dispatches compute the same model. The last lines: sync and generation time of torch over oneDNN.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _body(hf_dir: str, onednn: bool, prompts: int, tokens: int, repeats: int) -> dict:
    if not onednn:
        import vllm._custom_ops as ops

        ops._supports_onednn = False  # vLLM's dispatch falls back to torch.nn.functional.linear (this process only)
    import bench_weight_sync as ws

    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.rollout.sampler import SamplingConfig

    engine, arch, hf, model = ws._setup(hf_dir, 1)
    out = {"sync": ws._best(lambda: engine.update_weights(iter_hf_tensors(model, arch), bucket_bytes=256 << 20),
                            repeats)}
    out["clone"], out["copy_"] = ws._copies(hf, repeats)
    ids = [[1 + (i * 7 + j) % 200 for j in range(8)] for i in range(prompts)]
    params = SamplingConfig(n=1, max_tokens=tokens, seed=3)
    engine.generate(ids, params)
    start = time.perf_counter()
    gen = engine.generate(ids, params)
    out["generate"] = time.perf_counter() - start
    out["tokens"] = int(gen.lengths.sum())
    out["logprobs"] = [round(x, 4) for x in gen.rollout_logprobs[0][:4]]
    engine.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    hf_dir = str(save_tiny_hf_model(tempfile.mkdtemp() + "/m", "qwen2", hidden_size=args.hidden,
                                    num_heads=args.hidden // 32, num_kv_heads=args.hidden // 64,
                                    intermediate_size=4 * args.hidden, num_layers=args.layers, vocab_size=4096))
    print(f"model: hidden {args.hidden}, {args.layers} layers, vocab 4096 (fp32), one process", flush=True)
    print(f"{'dispatch':>8s} {'sync s':>7s} {'clone s':>8s} {'copy_ s':>8s} {'/clone':>7s} {'/copy_':>7s} "
          f"{'generate s':>10s} {'tokens':>6s}  first log-probs")
    results: dict[str, list[dict]] = {"oneDNN": [], "torch": []}
    for onednn in (True, False, True, False):
        r = run_distributed(_body, 1, hf_dir, onednn, args.prompts, args.tokens, args.repeats, timeout=900)[0]
        name = "oneDNN" if onednn else "torch"
        results[name].append(r)
        print(f"{name:>8s} {r['sync']:7.3f} {r['clone']:8.4f} {r['copy_']:8.4f} {r['sync'] / r['clone']:6.2f}x "
              f"{r['sync'] / r['copy_']:6.2f}x {r['generate']:10.2f} {r['tokens']:6d}  {r['logprobs']}", flush=True)
    best = {k: {m: min(r[m] for r in v) for m in ("sync", "generate")} for k, v in results.items()}
    print(f"sync torch/oneDNN: {best['torch']['sync'] / best['oneDNN']['sync']:.2f}x")
    print(f"generate torch/oneDNN: {best['torch']['generate'] / best['oneDNN']['generate']:.2f}x")


if __name__ == "__main__":
    main()
