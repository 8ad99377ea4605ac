"""Rollout/trainer mismatch on a tiny Qwen3-MoE: what routing replay and truncated importance sampling (TIS) change,
side by side in one run.

    .venv/bin/python benchmarks/moe_mismatch.py --out runs/moe_mismatch [--steps 4] [--dtype bfloat16]

Four VAPO runs of the same tiny MoE policy and critic (EP=2 on two gloo ranks, same seed, same prompts): neither
switch, `algorithm.tis_cap=2`, `algorithm.routing_replay=true`, and both. The trainer computes in `--dtype` while
vLLM's CPU build samples in float32, so the two disagree the way bf16 training kernels and a rollout engine do on
GPU; with `--dtype float32` they agree to ~1e-6 and neither switch has anything to correct.

Read step 1 first: every run has the same weights and the same samples there, so its numbers differ only by the
switches. Later steps differ also because the updates differ.
- `rollout_logprob_diff`: mean |log p_trainer - log p_vllm| over response tokens. Replay computes the trainer's
  log-probs with vLLM's experts, so it removes the part of the gap caused by tokens routed differently.
- `moe_replay_changed_frac` (replay runs): the replayed (token, expert) choices the trainer's own router would not
  have made, in its update forwards (routing drift between rollout and trainer).
- `tis_ratio_mean`, `tis_capped_frac` (TIS runs): the truncated ratio p_trainer_old / p_vllm and how often the cap
  bit.
- `policy_loss`, `grad_norm_actor`: the loss the switches reweight.

Resumable: a run whose metrics already hold `--steps` PPO steps is not run again (delete its directory to redo it).
Prints a Markdown table (and writes it to OUT/report.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

VARIANTS = {"none": [], "tis": ["algorithm.tis_cap=2"], "replay": ["algorithm.routing_replay=true"],
            "replay+tis": ["algorithm.routing_replay=true", "algorithm.tis_cap=2"]}
COLUMNS = ("rollout_logprob_diff", "policy/moe_replay_changed_frac", "policy/tis_ratio_mean", "policy/tis_capped_frac",
           "policy/pg_loss", "policy/grad_norm", "policy/moe_aux_loss")


def prepare(root: Path) -> Path:
    """A tiny Qwen3-MoE (8 experts, top-2, every layer sparse but one) and the synthetic task."""
    from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
    from vapo_megatron.models.tiny import save_tiny_hf_model

    if not (root / "READY").exists():
        save_tiny_hf_model(root / "model", "qwen3_moe", seed=0, hidden_size=128, num_heads=4, num_kv_heads=2,
                           head_dim=32, intermediate_size=192, num_experts=8, num_experts_per_tok=2,
                           moe_intermediate_size=64, num_layers=4, mlp_only_layers=[0], router_aux_loss_coef=0.01)
        write_synthetic_task(root / "data", num_train=256, num_val=8, num_demonstrations=8, seed=0,
                             difficulty=SyntheticDifficulty(min_steps=1, max_steps=3))
        (root / "READY").write_text("ok\n")
    return root


def overrides(assets: Path, run_dir: Path, steps: int, dtype: str) -> list[str]:
    return [f"model.hf_dir={assets / 'model'}", f"model.dtype={dtype}", "policy_parallel.ep=2",
            "critic_parallel.ep=2", "rollout.num_prompts=8", "rollout.n=4", "rollout.max_prompt_length=64",
            "rollout.max_response_length=48", "rollout.cpu_kv_cache_bytes=134217728", f"train.steps={steps}",
            "train.mini_batch_size=16", "train.micro_batch_size=4", "algorithm.value_pretrain_steps=0",
            "actor_optim.lr=1e-3", "critic_optim.lr=1e-3", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]",
            "reward.name=synthetic", f"checkpoint.run_dir={run_dir}", "checkpoint.save_every=0", "eval.every=0",
            "logging.progress_bar=false", "logging.tensorboard=false"]


def ppo_rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if r.get("phase") == "ppo"]


def run(assets: Path, out: Path, name: str, steps: int, dtype: str, extra: list[str]) -> list[dict]:
    run_dir = out / name
    if len(ppo_rows(run_dir)) < steps:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "vapo_megatron.cli",
               *overrides(assets, run_dir, steps, dtype), *extra, *VARIANTS[name], "--overwrite"]
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
        log = out / f"{name}.log"
        print(f"[moe_mismatch] {name}: {' '.join(VARIANTS[name]) or 'no switch'} -> {log}", flush=True)
        with open(log, "w") as f:
            subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, check=True)
    return ppo_rows(run_dir)


def table(results: dict[str, list[dict]]) -> str:
    def cell(rows: list[dict], key: str) -> str:
        vals = [r[key] for r in rows if key in r]
        return "-" if not vals else f"{sum(vals) / len(vals):.3g}"

    head = "| run | step-1 rollout_logprob_diff | " + " | ".join(f"{c} (mean)" for c in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, rows in results.items():
        lines.append(f"| {name} | {rows[0]['rollout_logprob_diff']:.4g} | "
                     + " | ".join(cell(rows, c) for c in COLUMNS) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/moe_mismatch")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--only", nargs="*", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    assets = prepare(out / "assets")
    results = {name: run(assets, out, name, args.steps, args.dtype, args.set) for name in args.only}
    report = (f"trainer {args.dtype}, vLLM float32; {args.steps} PPO steps of 32 samples; means over steps; "
              f"overrides {args.set}\n\n"
              + table(results) + "\n")
    (out / "report.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
