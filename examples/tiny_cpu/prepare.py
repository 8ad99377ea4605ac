"""Prepare the tiny CPU demo, all generated locally: the synthetic reasoning task (train / val prompts and
imperfect demonstrations), a character tokenizer, and a tiny Qwen2-shaped model warm-started by supervised
training on the demonstrations (plain PyTorch on one process: a preparation step, not the product).

    .venv/bin/python examples/tiny_cpu/prepare.py --out runs/tiny_cpu/assets
"""
from __future__ import annotations

import argparse

from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import add_prepare_arguments, prepare_demo_assets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(ap, out="runs/tiny_cpu/assets", sft_steps=500)
    ap.add_argument("--error-rate", type=float, default=0.6,
                    help="fraction of demonstrations with one slip (the warm start imitates them)")
    ap.add_argument("--max-steps", type=int, default=6, help="longest chain of the task (difficulty)")
    ap.add_argument("--max-value", type=int, default=9, help="largest value of any intermediate result")
    ap.add_argument("--max-operand", type=int, default=3, help="largest operand of a step")
    args = ap.parse_args()
    difficulty = SyntheticDifficulty(min_steps=1, max_steps=args.max_steps, max_value=args.max_value,
                                     max_operand=args.max_operand)
    prepare_demo_assets(args, lambda data: write_synthetic_task(
        data, num_train=4096, num_val=128, num_demonstrations=4096, error_rate=args.error_rate, seed=args.seed,
        difficulty=difficulty), done_note=" (the trainer's step-0 validation measures the starting accuracy)")


if __name__ == "__main__":
    main()
