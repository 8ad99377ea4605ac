"""Prepare the credit-assignment miniature, all generated locally: the bounded-walk task
(`vapo_megatron/data/bounded_walk.py`: long responses, a binary reward at the end, visible decisive mistakes),
the character tokenizer, and a tiny Qwen2-shaped model warm-started on imperfect demonstrations (valid walks
that leave the 0..9 range at a forced step with probability --slip-rate).

    .venv/bin/python examples/credit/prepare.py --out runs/credit/assets
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from vapo_megatron.data.bounded_walk import write_task
from vapo_megatron.models.tiny import save_tiny_hf_model, warm_start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/credit/assets")
    ap.add_argument("--sft-steps", type=int, default=800)
    ap.add_argument("--sft-batch", type=int, default=32)
    ap.add_argument("--sft-lr", type=float, default=3e-3)
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
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if (out / "READY").exists():
        print(f"[prepare] {out} is ready (delete it to rebuild)")
        return
    torch.manual_seed(args.seed)
    num_train = args.num_train or (600 if args.table == "constant" else 4096)
    layout = args.layout or ("total_first" if args.table == "constant" else "table")
    write_task(out / "data", slip_rate=args.slip_rate, min_steps=args.min_steps, max_steps=args.max_steps,
               seed=args.seed, table=args.table, layout=layout, num_train=num_train)
    model_dir = out / "model"
    save_tiny_hf_model(model_dir, "qwen2", seed=args.seed, hidden_size=args.hidden, num_layers=args.layers,
                       num_heads=args.hidden // 32, num_kv_heads=max(1, args.hidden // 64),
                       intermediate_size=2 * args.hidden)
    sft = [json.loads(line) for line in (out / "data" / "sft.jsonl").read_text().splitlines()]
    warm_start(model_dir, sft, args.sft_steps, args.sft_batch, args.sft_lr, args.seed)
    (out / "READY").write_text(json.dumps(vars(args)))
    print(f"[prepare] done: {out}")


if __name__ == "__main__":
    main()
