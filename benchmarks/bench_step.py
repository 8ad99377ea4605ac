"""One VAPO training step broken into phases (generation, reward, critic forward, old log-prob forward, actor
update, critic update, weight sync, other), as shares of the step, measured over a few steps of the tiny CPU
demo in one run. "other" is the trainer's own overhead (batch building, GAE, metrics, logging).

    .venv/bin/python benchmarks/bench_step.py [--steps 4] [dotted.overrides ...]
Needs the demo assets: `examples/tiny_cpu/prepare.py --out runs/tiny_cpu/assets` (run.sh makes them).
"""
from __future__ import annotations

import argparse
import json
import tempfile

PHASES = ("t_generation", "t_reward", "t_critic_forward", "t_old_logprob", "t_actor_update", "t_critic_update",
          "t_weight_sync", "t_other")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()
    from vapo_megatron.config import load_config
    from vapo_megatron.train.loop import train

    run_dir = tempfile.mkdtemp(prefix="bench_step_")
    cfg = load_config("examples/tiny_cpu/vapo.yaml", [
        f"train.steps={args.steps}", "algorithm.value_pretrain_steps=0", "eval.every=0",
        "logging.progress_bar=false", "logging.tensorboard=false", f"checkpoint.run_dir={run_dir}",
        "checkpoint.save_every=0", *args.overrides])
    train(cfg)
    rows = [json.loads(line) for line in open(f"{run_dir}/metrics.jsonl")][1:]  # first step: warm-up
    total = sum(r["t_step"] for r in rows)
    print(f"{len(rows)} PPO steps after one warm-up step, {total / len(rows):.2f} s per step")
    for phase in PHASES:
        spent = sum(r.get(phase, 0.0) for r in rows)
        print(f"  {phase[2:]:15s} {spent / len(rows):7.3f} s  {100 * spent / total:5.1f} %")


if __name__ == "__main__":
    main()
