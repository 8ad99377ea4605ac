"""Convert a megatron-core torch_dist checkpoint of the policy or critic, saved at any TP/PP layout, into a
Hugging Face model directory (sharded safetensors + index, config.json, tokenizer files).

    python tools/convert_megatron_to_hf.py --megatron-dir ckpt/step-1000/policy --out-dir export/policy
    python tools/convert_megatron_to_hf.py --megatron-dir raw_mcore_ckpt --out-dir out \\
        --hf-assets Qwen2.5-7B --role policy      # a checkpoint without vapo_checkpoint.json

A policy loads with `AutoModelForCausalLM.from_pretrained`; a critic is written as
`<Family>ForTokenClassification` with one label (per-token values; `score.bias` is zero). The model is
loaded one layer at a time (see vapo_megatron/convert/megatron_to_hf.py); the output directory appears
only once complete.
"""
from __future__ import annotations

import argparse
import sys


def _bytes(text: str) -> int:
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    for unit, scale in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * scale)
    return int(text)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--megatron-dir", required=True, help="torch_dist checkpoint directory")
    p.add_argument("--out-dir", required=True, help="HF model directory to create")
    p.add_argument("--hf-assets", default=None,
                   help="HF directory for config/tokenizer files (default: the checkpoint's hf_assets/)")
    p.add_argument("--role", choices=["policy", "critic"], default=None,
                   help="only needed for checkpoints without vapo_checkpoint.json")
    p.add_argument("--dtype", choices=["auto", "bf16", "fp32", "fp16"], default="auto",
                   help="dtype of the HF tensors; auto = as stored")
    p.add_argument("--max-shard-size", type=_bytes, default="5GB", help="e.g. 5GB, 500MB")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from vapo_megatron.convert.summary import run_converter

    args = parse_args(argv)

    def user_errors() -> tuple:
        from vapo_megatron.convert.mapping import ShapeMismatchError
        from vapo_megatron.models.hf_config import UnsupportedModelError

        return UnsupportedModelError, ShapeMismatchError, FileNotFoundError, FileExistsError

    def convert():
        from vapo_megatron.convert.megatron_to_hf import convert_megatron_to_hf

        return convert_megatron_to_hf(args.megatron_dir, args.out_dir, hf_assets=args.hf_assets, role=args.role,
                                      dtype=args.dtype, max_shard_bytes=args.max_shard_size,
                                      overwrite=args.overwrite, progress=not args.no_progress)

    return run_converter(convert, user_errors)


if __name__ == "__main__":  # required: megatron's checkpointing may start multiprocessing helpers
    sys.exit(main())
