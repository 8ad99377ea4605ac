"""Prepare the credit-assignment miniature, all generated locally: the bounded-walk task
(`vapo_megatron/data/bounded_walk.py`: long responses, a binary reward at the end, visible decisive mistakes),
the character tokenizer, and a tiny Qwen2-shaped model warm-started on imperfect demonstrations (valid walks
that leave the 0..9 range at a forced step with probability --slip-rate).

    .venv/bin/python examples/credit/prepare.py --out runs/credit/assets
"""
from __future__ import annotations

import argparse

from vapo_megatron.data.bounded_walk import write_task
from vapo_megatron.models.tiny import add_prepare_arguments, prepare_demo_assets


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_prepare_arguments(ap, out="runs/credit/assets", sft_steps=800)
    ap.add_argument("--slip-rate", type=float, default=0.2,
                    help="probability that a demonstration leaves the range at a forced step")
    ap.add_argument("--table", choices=("random", "constant"), default="constant",
                    help="random: a number per total (lookups can go wrong invisibly); constant: one number for "
                         "every total (every mistake is a visible out-of-range move)")
    ap.add_argument("--layout", choices=("table", "total_first"), default=None,
                    help="table: lines 'a 4:3 4+3=7'; total_first (constant tables; their default): lines "
                         "'a 04:3 07=04+3', the new total's first character is the move's decisive token")
    ap.add_argument("--num-train", type=int, default=None,
                    help="training prompts (default 4096; 600 for a constant table, which has 750 in all)")
    ap.add_argument("--min-steps", type=int, default=6)
    ap.add_argument("--max-steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    args = ap.parse_args()
    num_train = args.num_train or (600 if args.table == "constant" else 4096)
    layout = args.layout or ("total_first" if args.table == "constant" else "table")
    prepare_demo_assets(args, lambda data: write_task(
        data, slip_rate=args.slip_rate, min_steps=args.min_steps, max_steps=args.max_steps, seed=args.seed,
        table=args.table, layout=layout, num_train=num_train),
        model_kwargs=dict(hidden_size=args.hidden, num_layers=args.layers, num_heads=args.hidden // 32,
                          num_kv_heads=max(1, args.hidden // 64), intermediate_size=2 * args.hidden))


if __name__ == "__main__":
    main()
