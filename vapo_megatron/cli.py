"""Console entry points: `vapo-train` and `vapo-generate`."""
from __future__ import annotations

import argparse
import sys


def _train_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="vapo-train",
        description="VAPO (value-model-based augmented PPO) training on megatron-core with a vLLM hybrid engine. "
                    "Run under torchrun for several processes.")
    p.add_argument("--config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. algorithm.eps_high=0.28")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the run dir")
    return p


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    if args.config is None:
        _train_parser().print_help()
        return 0
    from vapo_megatron.config import load_config, validate
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.trainer import train

    cfg = load_config(args.config, args.overrides)
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    validate(cfg, world, load_arch(cfg.model.hf_dir) if cfg.model.hf_dir else None)
    train(cfg, resume=args.resume)
    return 0


def generate_main(argv: list[str] | None = None) -> int:
    from vapo_megatron.rollout.generate import generate_main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(train_main())
