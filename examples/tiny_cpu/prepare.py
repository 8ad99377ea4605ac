"""Prepare the tiny CPU demo, all generated locally: the synthetic reasoning task (train / val prompts and
imperfect demonstrations), a character tokenizer, and a tiny Qwen2-shaped model warm-started by supervised
training on the demonstrations (plain PyTorch on one process: a preparation step, not the product).

    .venv/bin/python examples/tiny_cpu/prepare.py --out runs/tiny_cpu/assets
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import save_tiny_hf_model, warm_start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/tiny_cpu/assets")
    ap.add_argument("--sft-steps", type=int, default=500)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
    ap.add_argument("--error-rate", type=float, default=0.6,
                    help="fraction of demonstrations with one slip (the warm start imitates them)")
    ap.add_argument("--max-steps", type=int, default=6, help="longest chain of the task (difficulty)")
    ap.add_argument("--max-value", type=int, default=9, help="largest value of any intermediate result")
    ap.add_argument("--max-operand", type=int, default=3, help="largest operand of a step")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    model_dir = out / "model"
    if (out / "READY").exists():
        print(f"[prepare] {out} is ready (delete it to rebuild)")
        return
    torch.manual_seed(args.seed)
    difficulty = SyntheticDifficulty(min_steps=1, max_steps=args.max_steps, max_value=args.max_value,
                                     max_operand=args.max_operand)
    write_synthetic_task(out / "data", num_train=4096, num_val=128, num_demonstrations=4096,
                         error_rate=args.error_rate, seed=args.seed, difficulty=difficulty)
    save_tiny_hf_model(model_dir, "qwen2", seed=args.seed)
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    warm_start(model_dir, sft, args.sft_steps, args.sft_batch, args.sft_lr, args.seed)
    (out / "READY").write_text(json.dumps(vars(args)))
    print(f"[prepare] done: {out} (the trainer's step-0 validation measures the starting accuracy)")


if __name__ == "__main__":
    main()
