"""One-GPU benchmark of the pieces a VAPO step is made of, on a Qwen2.5-shaped model with random weights (built in
code, nothing downloaded), written as JSON + Markdown to --out:

- Megatron training step (forward + backward through megatron-core's schedule, vocab-parallel log-prob loss,
  optimizer step), bf16, TransformerEngine spec when importable else megatron's local spec: tokens/s and MFU;
- decoupled, length-adaptive GAE (vapo_megatron.algorithms.decoupled_gae) on a rollout-sized batch;
- vocab-parallel log-prob + entropy forward and backward (vapo_megatron/parallel/vocab_parallel.py);
- weight sync Megatron -> vLLM (bucketed push into a dummy-weight engine) when vLLM imports;
- with `--placements`: both placements and both weight transports, by running the CPU benchmarks on this machine
  (`benchmarks/bench_async.py`: colocated sync, separate sync, separate k = 1, samples/s and idle fractions;
  `benchmarks/bench_weight_sync.py`: the colocated push and the broadcast transport against a copy), each in its
  own processes with a time limit; their tables go into the report as printed. On one GPU both pools share it,
  so the bridge carries weights over gloo (rollout/channel.py); NCCL between the pools needs two GPUs.

    python benchmarks/gpu/bench_gpu.py --size 1.5B --seq-len 4096 --out runs/bench_gpu
    python benchmarks/gpu/bench_gpu.py --device cpu --tiny --out /tmp/bench     # smoke test of the code paths

MFU = model FLOPs per second / the GPU's peak dense bf16 FLOPs. Model FLOPs per trained token (forward +
backward, no recompute counted, as in Megatron-LM and PaLM): 6 N + 12 L h s, where N is the parameter count
without the input embedding (a lookup, not a matmul; the output layer is counted), L layers, h = heads x
head_dim, s the sequence length (the attention score and value matmuls, counted over the full s x s square
although causal attention needs half). Peak: H100 SXM / H200 / H800 989e12, H100 PCIe 756e12, A100 312e12; other
GPUs and the CPU report MFU as n/a.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout without installing

PEAK_BF16 = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("A100", 312e12))
SIZES = ("0.5B", "1.5B", "3B", "7B")


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak of a GPU named like torch.cuda.get_device_name(); None when unknown."""
    name = device_name.upper()
    return next((peak for key, peak in PEAK_BF16 if all(part in name for part in key.upper().split())), None)


def model_flops_per_token(arch, seq_len: int) -> float:
    from vapo_megatron.planning.params import total_params

    n = total_params(arch) - (0 if arch.tie_word_embeddings else arch.vocab_size * arch.hidden_size)
    return 6 * n + 12 * arch.num_layers * arch.num_heads * arch.head_dim * seq_len


def tiny_arch():
    from vapo_megatron.models.hf_config import ModelArch

    return ModelArch(family="qwen2", vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                     head_dim=32, ffn_hidden_size=256, norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096,
                     tie_word_embeddings=False, qkv_bias=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, repeats: int, warmup: int) -> list[float]:
    """Seconds of each of `repeats` calls after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def init_single_process(device: str) -> None:
    """One-rank torch.distributed + megatron parallel state (TP = PP = 1)."""
    if device == "cpu":
        os.environ["VAPO_FORCE_CPU"] = "1"  # also on a GPU machine: keep megatron and the process group on CPU
    from vapo_megatron.parallel.layout import ParallelConfig, init_distributed, initialize

    init_distributed()
    initialize(ParallelConfig())


def bench_train_step(arch, args, dtype: torch.dtype) -> tuple[dict, torch.nn.Module]:
    """Megatron forward + backward + optimizer step on random tokens; the loss is the policy's log-prob path.
    Returns the timings and the (trained) model."""
    from vapo_megatron.data.rl_batch import MicroBatch
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.optim import build_optimizer
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.parallel.layout import ParallelConfig
    from vapo_megatron.parallel.vocab_parallel import megatron_vocab_logprobs_entropy

    built = build_model(arch, ParallelConfig(), "policy", params_dtype=dtype)
    optimizer = build_optimizer(built.model, lr=1e-6, bf16=dtype == torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    micro = [MicroBatch(input_ids=torch.randint(0, arch.vocab_size, (args.micro_batch, args.seq_len), generator=gen)
              .to(args.device)) for _ in range(args.micro_batches)]
    tokens = args.micro_batch * args.seq_len * args.micro_batches

    def loss_fn(logits, mb):
        targets = torch.roll(mb.input_ids, -1, dims=1)
        logprobs, _ = megatron_vocab_logprobs_entropy(logits, targets, arch.vocab_size)
        loss = -logprobs.sum() / tokens  # token-level mean over the whole step, as the trainer's losses
        return loss, {"loss": loss.detach()}

    def step():
        built.model.zero_grad_buffer()
        optimizer.zero_grad()
        forward_backward(built.model, micro, loss_fn, groups=built.groups)
        optimizer.step()

    times = timed(step, args.device, args.repeats, args.warmup)
    sec = statistics.median(times)
    result = {"tokens_per_step": tokens, "step_s": sec, "tokens_per_s": tokens / sec,
              "model_flops_per_token": model_flops_per_token(arch, args.seq_len)}
    if args.device == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 1024**3
    return result, built.model


def bench_gae(args) -> dict:
    from vapo_megatron.algorithms.advantages import decoupled_gae

    b, t = args.gae_batch, args.gae_len
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(t // 8, t + 1, (b,), generator=gen)
    mask = (torch.arange(t)[None, :] < lengths[:, None]).to(args.device)
    values = torch.randn(b, t, generator=gen).to(args.device)
    rewards = torch.zeros(b, t, device=args.device)
    rewards[torch.arange(b), lengths - 1] = 1.0
    times = timed(lambda: decoupled_gae(rewards, values, mask, alpha=0.05, lam_critic=1.0), args.device,
                  args.repeats, args.warmup)
    return {"batch": b, "max_len": t, "tokens": int(lengths.sum()), "seconds": statistics.median(times)}


def bench_logprobs(arch, args, dtype: torch.dtype) -> dict:
    from vapo_megatron.parallel.vocab_parallel import vocab_parallel_logprobs_entropy

    tokens, vocab = args.seq_len * args.micro_batch, arch.vocab_size
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(tokens, vocab, generator=gen).to(device=args.device, dtype=dtype).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen).to(args.device)

    def run():
        logprobs, entropy = vocab_parallel_logprobs_entropy(logits, targets)
        (logprobs.sum() + entropy.sum()).backward()
        logits.grad = None

    times = timed(run, args.device, args.repeats, args.warmup)
    return {"tokens": tokens, "vocab": vocab, "seconds": statistics.median(times),
            "tokens_per_s": tokens / statistics.median(times)}


def _vllm_model_dir(arch, root: str) -> str:
    """An HF config + tokenizer of `arch` for a dummy-weight vLLM engine (weights arrive by the sync)."""
    from vapo_megatron.models.tiny import build_char_tokenizer, tiny_hf_config

    cfg = tiny_hf_config("qwen2", vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                         num_layers=arch.num_layers, num_heads=arch.num_heads, num_kv_heads=arch.num_kv_heads,
                         intermediate_size=arch.ffn_hidden_size, max_position_embeddings=arch.max_position_embeddings,
                         tie_word_embeddings=arch.tie_word_embeddings, rope_theta=arch.rope_theta)
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(root)
    build_char_tokenizer().save_pretrained(root)
    return root


def bench_weight_sync(arch, args, model) -> dict:
    """Seconds to push every weight of the live Megatron model into a colocated vLLM engine."""
    try:
        import vllm  # noqa: F401
    except ImportError:
        return {"status": "vLLM absent: Megatron side only"}
    from vapo_megatron.engine.export import iter_hf_tensors
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    try:
        engine = RolloutEngine(_vllm_model_dir(arch, tempfile.mkdtemp(prefix="bench_gpu_hf_")), load_format="dummy",
                               tensor_parallel_size=1, max_model_len=args.seq_len, seed=0)
        times = timed(lambda: engine.update_weights(iter_hf_tensors(model, arch), bucket_bytes=args.bucket_bytes),
                      args.device, args.repeats, 1)
        engine.shutdown()
    except Exception as exc:  # noqa: BLE001 - the rest of the report is still worth writing
        return {"status": f"failed: {type(exc).__name__}: {exc}"}
    return {"status": "ok", "seconds": statistics.median(times), "bucket_bytes": args.bucket_bytes}


PLACEMENT_BENCHES = (
    ("async", ["benchmarks/bench_async.py", "--steps", "6"]),
    ("weight_sync", ["benchmarks/bench_weight_sync.py", "--hidden", "1024", "--layers", "8", "--tp", "1"]),
)


def bench_placements(timeout_s: float, benches=PLACEMENT_BENCHES) -> dict:
    """Each placement benchmark in a subprocess of this checkout (its own process group and engines), its last
    lines kept: {name: {"status", "seconds", "output"}}."""
    import subprocess

    root, out = Path(__file__).resolve().parents[2], {}
    for name, command in benches:
        start = time.perf_counter()
        try:
            done = subprocess.run([sys.executable, *command], cwd=root, capture_output=True, text=True,
                                  timeout=timeout_s, env={**os.environ, "PYTHONPATH": str(root)})
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
            text = done.stdout if done.returncode == 0 else done.stdout + done.stderr
        except subprocess.TimeoutExpired as exc:
            status, text = f"timed out after {timeout_s:g} s", (exc.stdout or b"").decode(errors="replace")
        lines = text.strip().splitlines()[-12:]
        out[name] = {"status": status, "seconds": round(time.perf_counter() - start, 1), "output": lines}
    return out


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2))
    t, s = report["train_step"], report["settings"]
    mfu = f"{100 * report['mfu']:.1f}%" if report["mfu"] is not None else "n/a"
    ws = report["weight_sync"]
    sync = f"{ws['seconds']:.3f} s" if "seconds" in ws else ws["status"]
    lines = [f"# GPU benchmark, {report['date']}", "",
             f"device: {report['device_name']}; torch {report['torch']}, megatron-core {report['megatron_core']}, "
             f"layer spec: {report['layer_spec']}", "",
             f"model: {s['model']} ({report['params'] / 1e9:.3f}B parameters), seq {s['seq_len']}, micro-batch "
             f"{s['micro_batch']} x {s['micro_batches']}, dtype {s['dtype']}", "",
             "| measurement | value |", "|---|---|",
             f"| training step | {t['step_s']:.3f} s, {t['tokens_per_s']:,.0f} tokens/s, MFU {mfu} |",
             f"| GAE ({report['gae']['batch']} x {report['gae']['max_len']}) | "
             f"{report['gae']['seconds'] * 1e3:.2f} ms |",
             f"| vocab-parallel log-prob fwd+bwd ({report['logprobs']['tokens']} x {report['logprobs']['vocab']}) | "
             f"{report['logprobs']['seconds'] * 1e3:.2f} ms |",
             f"| weight sync to vLLM | {sync} |", ""]
    for name, res in report.get("placements", {}).items():
        lines += [f"## {name} ({res['status']}, {res['seconds']} s)", "", "```", *res["output"], "```", ""]
    (out / "bench_gpu.md").write_text("\n".join(lines))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="0.5B", help="Qwen2.5 shape (random weights)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 128-wide model: smoke test of the code paths")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--micro-batches", type=int, default=4, help="micro-batches per optimizer step")
    p.add_argument("--gae-batch", type=int, default=512)
    p.add_argument("--gae-len", type=int, default=8192)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--bucket-bytes", type=int, default=256 * 1024**2)
    p.add_argument("--no-vllm", action="store_true", help="skip the weight-sync measurement")
    p.add_argument("--placements", action="store_true",
                   help="also run benchmarks/bench_async.py and bench_weight_sync.py (both placements and transports)")
    p.add_argument("--placement-timeout", type=float, default=900, help="seconds each placement benchmark may take")
    p.add_argument("--out", required=True, help="directory for bench_gpu.json and bench_gpu.md")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: no CUDA device; use --device cpu --tiny for a smoke run", file=sys.stderr)
        return 2
    init_single_process(args.device)
    from megatron.core import __version__ as mcore_version

    from vapo_megatron.models.specs import transformer_engine_available
    from vapo_megatron.planning.params import total_params
    from vapo_megatron.planning.presets import qwen25_arch

    arch = tiny_arch() if args.tiny else qwen25_arch(args.size)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32  # CPU: megatron's bf16 paths are GPU-only
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    train, model = bench_train_step(arch, args, dtype)
    peak = peak_flops(name) if args.device == "cuda" else None
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "device_name": name,
        "torch": torch.__version__, "megatron_core": mcore_version,
        "layer_spec": "transformer_engine" if transformer_engine_available() else "local",
        "settings": {"model": "tiny" if args.tiny else f"Qwen2.5-{args.size}", "seq_len": args.seq_len,
                     "micro_batch": args.micro_batch, "micro_batches": args.micro_batches, "dtype": str(dtype)},
        "params": total_params(arch), "train_step": train, "peak_flops": peak,
        "mfu": train["tokens_per_s"] * train["model_flops_per_token"] / peak if peak else None,
        "gae": bench_gae(args), "logprobs": bench_logprobs(arch, args, dtype),
    }
    report["weight_sync"] = ({"status": "skipped (--no-vllm)"} if args.no_vllm
                             else bench_weight_sync(arch, args, model))
    if args.placements:
        report["placements"] = bench_placements(args.placement_timeout)
    write_report(report, Path(args.out))
    print((Path(args.out) / "bench_gpu.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
