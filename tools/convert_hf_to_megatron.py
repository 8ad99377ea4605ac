"""Convert a Hugging Face checkpoint (Qwen2/Qwen2.5, Qwen3, Qwen3-MoE, Llama, Mistral-without-sliding-window) into
a megatron-core torch_dist checkpoint that training loads at any TP/PP/EP layout.

    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B --out-dir ckpt/policy-init
    python tools/convert_hf_to_megatron.py --hf-dir Qwen2.5-7B-RM --out-dir ckpt/critic-init --role critic

`--role critic` takes the value head from the checkpoint's `score.weight` (a reward / sequence-classification
model with one label) and otherwise draws it from N(0, initializer_range) with `--seed`. Tensors keep the
checkpoint's dtype unless `--dtype` says otherwise. The model is never held in memory (see
vapo_megatron/convert/hf_to_megatron.py); the output directory appears only once complete.
"""
from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--out-dir", required=True, help="torch_dist checkpoint directory to create")
    p.add_argument("--role", choices=["policy", "critic"], default="policy")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto",
                   help="dtype of the stored tensors; auto = as in the HF checkpoint")
    p.add_argument("--seed", type=int, default=0, help="seed of a freshly initialised critic value head")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from vapo_megatron.convert.summary import run_converter

    args = parse_args(argv)

    def user_errors() -> tuple:
        from vapo_megatron.convert.hf_io import MissingShardError, MissingTensorError, TruncatedShardError
        from vapo_megatron.convert.mapping import ShapeMismatchError
        from vapo_megatron.models.hf_config import UnsupportedModelError

        return (UnsupportedModelError, MissingShardError, TruncatedShardError, MissingTensorError,
                ShapeMismatchError, FileExistsError, FileNotFoundError)

    def convert():
        from vapo_megatron.convert.hf_to_megatron import convert_hf_to_megatron

        return convert_hf_to_megatron(args.hf_dir, args.out_dir, role=args.role, dtype=args.dtype, seed=args.seed,
                                      overwrite=args.overwrite, progress=not args.no_progress)

    return run_converter(convert, user_errors)


if __name__ == "__main__":  # required: megatron's checkpointing may start multiprocessing helpers
    sys.exit(main())
