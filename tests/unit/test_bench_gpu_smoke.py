"""benchmarks/gpu/bench_gpu.py: the GPU detection table, and a tiny CPU run of every code path (training step
through megatron-core, GAE, vocab-parallel log-probs, reports) in a subprocess, since it initialises
torch.distributed and megatron's global state. A failure means the GPU benchmark would crash before measuring."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu" / "bench_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_peak_flops_table():
    bench = _module()
    assert bench.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert bench.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert bench.peak_flops("NVIDIA H200") == 989e12
    assert bench.peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert bench.peak_flops("Tesla T4") is None


def test_flops_formula_counts_attention_and_skips_the_embedding():
    from vapo_megatron.planning.params import total_params
    from vapo_megatron.planning.presets import qwen25_arch

    bench, arch = _module(), qwen25_arch("7B")
    n = total_params(arch) - arch.vocab_size * arch.hidden_size  # untied: the output layer stays
    assert bench.model_flops_per_token(arch, 4096) == 6 * n + 12 * 28 * 28 * 128 * 4096


def test_tiny_cpu_run_writes_reports(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--seq-len", "32", "--micro-batches", "2",
           "--gae-batch", "4", "--gae-len", "32", "--repeats", "1", "--warmup", "1", "--no-vllm", "--out",
           str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "bench_gpu.json").read_text())
    assert report["mfu"] is None and report["device_name"] == "cpu"
    assert report["train_step"]["tokens_per_s"] > 0 and report["gae"]["seconds"] > 0
    assert "MFU n/a" in (tmp_path / "bench_gpu.md").read_text()


def test_placement_benchmarks_are_run_and_reported_whatever_happens(tmp_path):
    """--placements runs each CPU placement benchmark in its own process; one that fails or overruns is reported
    as such with its last lines, and the others still run (stand-in commands here; the real ones need minutes)."""
    bench = _module()
    res = bench.bench_placements(3, (("ok", ["-c", "print('async/separate-sync: 1.50x')"]),
                                     ("bad", ["-c", "import sys; print('half'); sys.exit(3)"]),
                                     ("slow", ["-c", "import time; time.sleep(30)"])))
    assert res["ok"]["status"] == "ok" and res["ok"]["output"] == ["async/separate-sync: 1.50x"]
    assert res["bad"]["status"] == "failed (exit 3)" and res["bad"]["output"] == ["half"]
    assert res["slow"]["status"].startswith("timed out after 3")
    assert [name for name, _ in bench.PLACEMENT_BENCHES] == ["async", "weight_sync"]
    assert all((Path(bench.__file__).parents[2] / cmd[0]).exists() for _, cmd in bench.PLACEMENT_BENCHES)
