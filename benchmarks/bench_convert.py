"""Checkpoint conversion throughput and peak memory on a synthetic Qwen2-shaped model of about 1.1 GB (bf16).

Run: ``OMP_NUM_THREADS=1 python benchmarks/bench_convert.py`` (1-3 minutes on 2 cores; ``--workdir`` to keep
the files, ``--layers``/``--hidden`` to change the size). Every stage runs in its own child process, so each
peak RSS (the kernel's VmHWM) belongs to that stage alone; timed stages run ``--repeat`` times (default 2)
and the fastest run counts, because the first pass over fresh memory of this VM is slowed by the host:

- setup: writes the synthetic HF checkpoint (random bf16 weights, 3 shards, a config.json written here);
- baseline: plain safetensors read + write of the same bytes, shard by shard (`load_file` + `save_file`);
- hf2meg: tools/convert_hf_to_megatron.py (HF -> torch_dist);
- meg2hf: tools/convert_megatron_to_hf.py (torch_dist -> HF), then a bitwise check against the input.

Figures: GB/s of each conversion divided by the baseline's (the ratio is the figure: the files sit in the
page cache, so absolute speed is memory bandwidth and serialization, not disk), and peak RSS beside the
largest single tensor and beside the process's RSS after its imports (what Python, torch and megatron-core
cost before any tensor exists). `anon` is the peak of anonymous memory sampled every 10 ms, i.e. without
the pages of memory-mapped files, which the kernel can drop under pressure.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _status(field: str) -> int:
    """A /proc/self/status field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class AnonPeak:
    """Samples RssAnon in a thread (the kernel keeps no high-water mark for it)."""

    def __init__(self):
        self.peak, self._stop = _status("RssAnon"), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, _status("RssAnon"))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def synthetic_config(layers: int, hidden: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=32768, hidden_size=hidden, intermediate_size=hidden * 7 // 2,
                       num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                       max_position_embeddings=4096, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"],
                       dtype="bfloat16")


def stage_setup(work: Path, layers: int, hidden: int) -> dict:
    """Random bf16 weights for every HF tensor of the config, generated and written one tensor at a time."""
    import torch

    from vapo_megatron.convert.hf_io import SafetensorsShardWriter, TensorSpec
    from vapo_megatron.convert.mapping import hf_shapes, param_maps
    from vapo_megatron.models.hf_config import arch_from_hf

    cfg = synthetic_config(layers, hidden)
    arch = arch_from_hf(cfg)
    specs = [TensorSpec(n, s, torch.bfloat16) for pm in param_maps(arch) for n, s in hf_shapes(pm, arch).items()]
    hf = work / "hf"
    hf.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    with SafetensorsShardWriter(hf, specs, max_shard_bytes=400 * 10**6) as writer:
        for s in specs:
            writer.write(s.name, (0.02 * torch.randn(s.shape, generator=gen)).to(torch.bfloat16))
    cfg.save_pretrained(hf)
    return {"bytes": sum(s.nbytes for s in specs), "largest": max(s.nbytes for s in specs),
            "tensors": len(specs), "shards": len(writer.file_names)}


def stage_baseline(work: Path) -> dict:
    from safetensors.torch import load_file, save_file

    out = work / "baseline"
    out.mkdir()
    total = 0
    for path in sorted((work / "hf").glob("*.safetensors")):
        tensors = load_file(path)
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, out / path.name, metadata={"format": "pt"})
        del tensors
    return {"bytes": total}


def stage_hf2meg(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_hf_to_megatron

    assert convert_hf_to_megatron.main(["--hf-dir", str(work / "hf"), "--out-dir", str(work / "meg"),
                                        "--no-progress"]) == 0
    return {}


def stage_meg2hf(work: Path) -> dict:
    sys.path.insert(0, str(ROOT / "tools"))
    import convert_megatron_to_hf

    assert convert_megatron_to_hf.main(["--megatron-dir", str(work / "meg"), "--out-dir", str(work / "hf_out"),
                                        "--max-shard-size", "400MB", "--no-progress"]) == 0
    return {}


def stage_check(work: Path) -> dict:
    """Bitwise comparison of the round trip, one tensor at a time."""
    import torch

    from vapo_megatron.convert.hf_io import HFCheckpointReader

    a, b = HFCheckpointReader(work / "hf"), HFCheckpointReader(work / "hf_out")
    same = sorted(a.names()) == sorted(b.names()) and all(torch.equal(a.get(n), b.get(n)) for n in a.names())
    return {"identical": same}


STAGES = {"setup": stage_setup, "baseline": stage_baseline, "hf2meg": stage_hf2meg, "meg2hf": stage_meg2hf,
          "check": stage_check}


def child(stage: str, work: Path, args: argparse.Namespace) -> None:
    """Run one stage in this process and print its measurements as one JSON line."""
    import shutil

    import torch  # noqa: F401 - library imports are one-time costs, outside the timed part
    from transformers import AutoConfig, Qwen2Config  # noqa: F401

    if stage in ("hf2meg", "meg2hf"):
        os.environ.setdefault("VAPO_FORCE_CPU", "1")
        from vapo_megatron import platform

        platform.install_shims()  # entry point of the child: before megatron-core is imported
        import vapo_megatron.convert.dist_ckpt  # noqa: F401 - megatron-core
    rss_imports, anon_imports = _status("VmRSS"), _status("RssAnon")
    outputs = {"baseline": "baseline", "hf2meg": "meg", "meg2hf": "hf_out"}
    repeats = args.repeat if stage in outputs else 1
    kwargs = {"layers": args.layers, "hidden": args.hidden} if stage == "setup" else {}
    times = []
    with AnonPeak() as anon:
        for i in range(repeats):
            if i:
                shutil.rmtree(work / outputs[stage])
            start = time.perf_counter()
            result = STAGES[stage](work, **kwargs)
            times.append(time.perf_counter() - start)
    result.update(seconds=min(times), times=times, peak_rss=_status("VmHWM"), rss_imports=rss_imports,
                  anon_imports=anon_imports, peak_anon=anon.peak)
    print("RESULT " + json.dumps(result))


def run_stage(stage: str, work: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", stage, "--workdir", str(work), "--layers", str(args.layers),
           "--hidden", str(args.hidden), "--repeat", str(args.repeat)]
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"stage {stage} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def report(setup: dict, results: dict) -> None:
    gib, size, largest = 2**30, setup["bytes"], setup["largest"]
    print(f"model: {setup['tensors']} bf16 tensors, {size / 1e9:.3f} GB in {setup['shards']} shards; largest tensor "
          f"{largest / gib:.3f} GiB")
    base_rate = size / results["baseline"]["seconds"] / 1e9
    print("memory in GiB; 'above' = peak minus the process's footprint after its imports; x = above / largest tensor")
    print(f"{'stage':9s} {'seconds':>7s} {'GB/s':>5s} {'ratio':>5s} | {'peak RSS':>8s} {'imports':>7s} {'above':>6s} "
          f"{'x':>5s} | {'peak anon':>9s} {'above':>6s} {'x':>5s}")
    for stage in ("baseline", "hf2meg", "meg2hf"):
        r = results[stage]
        rate = size / r["seconds"] / 1e9
        above, anon_above = r["peak_rss"] - r["rss_imports"], r["peak_anon"] - r["anon_imports"]
        print(f"{stage:9s} {r['seconds']:7.2f} {rate:5.2f} {rate / base_rate:5.2f} | {r['peak_rss'] / gib:8.3f} "
              f"{r['rss_imports'] / gib:7.3f} {above / gib:6.3f} {above / largest:5.1f} | "
              f"{r['peak_anon'] / gib:9.3f} {anon_above / gib:6.3f} {anon_above / largest:5.1f}")
    print(f"round trip HF -> Megatron -> HF bit-identical: {results['check']['identical']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default=None, help="keep the files here (default: a temporary directory)")
    p.add_argument("--layers", type=int, default=36)
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--repeat", type=int, default=2, help="runs of each timed stage; the fastest counts")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, Path(args.workdir), args)
        return
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        setup = run_stage("setup", work, args)
        results = {s: run_stage(s, work, args) for s in ("baseline", "hf2meg", "meg2hf", "check")}
        report(setup, results)


if __name__ == "__main__":  # required: megatron's checkpointing may start multiprocessing helpers
    main()
