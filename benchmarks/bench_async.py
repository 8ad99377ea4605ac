"""Separate placement and asynchronous rollouts at equal work (issue 24, item 7): the same run (tiny task, same
prompts, seeds, steps) three ways, on the same cores:

- colocated sync: 1 rank, vLLM inside the trainer process (the reference);
- separate sync: 1 trainer rank + 1 rollout rank, rollout.max_staleness=0;
- separate k=1: the same two ranks, rollout.max_staleness=1 (generation of step s+1 overlaps training of s).

    .venv/bin/python benchmarks/bench_async.py [--steps 12 --prompts 8 --n 4 --response 192]

The default workload balances the two pools (generation of responses up to 192 tokens takes about as long as
the trainer's step on one core each), the regime separate placement is for: long reasoning responses, where
generation is most of an RL step. The speed-up is bounded by (train + generate) / max(train, generate), so
it shrinks where one pool dominates: at `--response 48` (generation about a third of the trainer's step) it
measured 1.18-1.19x (docs/async.md). 12 steps, not fewer: the first batch of an asynchronous run cannot
overlap anything, and a short run weighs it more.

samples/s = trained samples / the summed step wall time of metrics.jsonl (t_* of every step; start-up and the
engines' construction excluded, the same for all three). Idle fractions: the trainer's share of step time spent
waiting for samples (t_generation: in the colocated run that is the trainer's own generation, both "pools" are
the same process); the rollout pool's 1 - busy / wall over its serving loop (busy: generating and loading
weights), from the rollout rank. Last line: `async/separate-sync: N.NNx` (samples/s of k=1 over k=0).
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from vapo_megatron.testing.assets import tiny_task_assets
from vapo_megatron.testing.dist import run_distributed


def _colocated(overrides):
    from vapo_megatron.config import load_config
    from vapo_megatron.train.loop import Trainer

    return Trainer(load_config(None, overrides)).run()


def _separate(overrides):
    from vapo_megatron.config import load_config
    from vapo_megatron.rollout.async_pool import serve_rollouts
    from vapo_megatron.rollout.placement import split_world
    from vapo_megatron.train.loop import Trainer

    cfg = load_config(None, overrides)
    pools = split_world(cfg)
    return serve_rollouts(cfg, pools) if pools.role == "rollout" else Trainer(cfg, pools=pools).run()


def _overrides(assets: Path, run_dir: Path, args, *extra) -> list[str]:
    return [f"model.hf_dir={assets / 'model'}", "model.dtype=float32", f"rollout.num_prompts={args.prompts}",
            f"rollout.n={args.n}", "rollout.max_prompt_length=64", f"rollout.max_response_length={args.response}",
            "rollout.cpu_kv_cache_bytes=134217728", f"train.steps={args.steps}",
            f"train.mini_batch_size={args.prompts * args.n // 2}", "train.micro_batch_size=4",
            "algorithm.value_pretrain_steps=0", "algorithm.tis_cap=2.0", "actor_optim.lr=1e-4",
            "critic_optim.lr=1e-4", f"data.train_files=[{assets / 'data' / 'train.jsonl'}]", "reward.name=synthetic",
            f"checkpoint.run_dir={run_dir}", "logging.progress_bar=false", "logging.tensorboard=false",
            "checkpoint.export_hf_at_end=false", *extra]


def _measure(run_dir: Path, samples_per_step: int) -> tuple[float, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    wall = sum(sum(v for k, v in r.items() if k.startswith("t_")) for r in rows)
    waiting = sum(r.get("t_generation", 0.0) for r in rows)
    return len(rows) * samples_per_step / wall, waiting / wall


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--response", type=int, default=192)
    args = p.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench_async_"))
    assets = tiny_task_assets(root / "assets", num_val=8)
    per_step = args.prompts * args.n
    results = {}
    run_distributed(_colocated, 1, _overrides(assets, root / "colocated", args), timeout=1800)
    results["colocated sync"] = (*_measure(root / "colocated", per_step), None)
    for name, k in (("separate sync", 0), ("separate k=1", 1)):
        out = run_distributed(_separate, 2, _overrides(assets, root / name.replace(" ", "_"), args,
                                                       "rollout.placement=separate", "rollout.rollout_ranks=1",
                                                       f"rollout.max_staleness={k}"), timeout=1800)
        results[name] = (*_measure(root / name.replace(" ", "_"), per_step), out[1]["idle_frac"])
    print(f"{'mode':16s} {'samples/s':>10s} {'trainer idle':>13s} {'rollout idle':>13s}")
    for name, (rate, t_idle, r_idle) in results.items():
        r = "(same ranks)" if r_idle is None else f"{r_idle:.3f}"
        print(f"{name:16s} {rate:10.2f} {t_idle:13.3f} {r:>13s}")
    print(f"async/separate-sync: {results['separate k=1'][0] / results['separate sync'][0]:.2f}x")


if __name__ == "__main__":
    main()
