"""Verify a training checkpoint against its manifest.json, or write one for a checkpoint that has none.

    python tools/checkpoint_manifest.py RUN_DIR/checkpoints/step_00000200            # verify: exit 0 or 1
    python tools/checkpoint_manifest.py --write RUN_DIR/checkpoints/step_00000200    # bless an old checkpoint

`--write` is for checkpoints saved before checksums existed, after you have checked them by other means: from
then on `vapo-train --resume` refuses any change to their bytes. It refuses to overwrite an existing manifest.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from vapo_megatron.engine.manifest import MANIFEST_FILE, verify_local, write_manifest

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", type=Path, help="a checkpoint directory (step_XXXXXXXX)")
    p.add_argument("--write", action="store_true", help="write manifest.json for a checkpoint that has none")
    args = p.parse_args(argv)
    if not args.checkpoint.is_dir():
        print(f"error: {args.checkpoint} is not a directory", file=sys.stderr)
        return 1
    if args.write:
        if (args.checkpoint / MANIFEST_FILE).exists():
            print(f"error: {args.checkpoint / MANIFEST_FILE} exists; it is not overwritten", file=sys.stderr)
            return 1
        print(f"wrote {write_manifest(args.checkpoint)}")
        return 0
    problems = verify_local(args.checkpoint)
    for problem in problems:
        print(f"error: {args.checkpoint}: {problem}", file=sys.stderr)
    if not problems:
        print(f"{args.checkpoint}: every file matches {MANIFEST_FILE}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
