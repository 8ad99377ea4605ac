"""Prepare the tiny CPU demo, all generated locally: the synthetic reasoning task (train / val prompts and
imperfect demonstrations), a character tokenizer, and a tiny Qwen2-shaped model warm-started by supervised
training on the demonstrations (plain PyTorch on one process: a preparation step, not the product).

    .venv/bin/python examples/tiny_cpu/prepare.py --out runs/tiny_cpu/assets
"""
from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from vapo_megatron.data.synthetic import SyntheticDifficulty, write_synthetic_task
from vapo_megatron.models.tiny import build_char_tokenizer, save_tiny_hf_model


def _encode(tok, prompt: str, response: str) -> tuple[list[int], int]:
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return ids + tok.encode(response, add_special_tokens=False) + [tok.eos_token_id], len(ids)


def warm_start(model_dir: Path, sft_rows: list[dict], steps: int, batch: int, lr: float, seed: int) -> None:
    from transformers import AutoModelForCausalLM

    tok = build_char_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = random.Random(seed)
    encoded = [_encode(tok, r["prompt"], r["response"]) for r in sft_rows]
    model.train()
    t0 = time.time()
    for step in range(steps):
        rows = rng.sample(encoded, batch)
        width = max(len(ids) for ids, _ in rows)
        ids = torch.zeros(batch, width, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        for i, (seq, plen) in enumerate(rows):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, plen: len(seq)] = torch.tensor(seq[plen:])
        for g in opt.param_groups:  # linear warmup then cosine decay
            g["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.1416)).item())
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"[warm start] step {step:4d} loss {loss.item():.4f} ({time.time() - t0:.0f}s)", flush=True)
    model.save_pretrained(model_dir)


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
