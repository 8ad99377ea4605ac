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
    dry = p.add_argument_group("dry run (no GPU, no process group)")
    dry.add_argument("--dry-run", action="store_true",
                     help="validate the config for --world-size, print the parallel and memory plan, and exit "
                          "(0: valid, 2: invalid)")
    dry.add_argument("--world-size", type=int, default=None, help="GPUs of the planned run (default: $WORLD_SIZE or 1)")
    dry.add_argument("--arch", default=None,
                     help="model shape when model.hf_dir is not on this machine: a Qwen2.5 size (0.5B ... 72B), an "
                          "HF directory or a config.json")
    dry.add_argument("--gpus-per-node", type=int, default=8)
    dry.add_argument("--gpu-memory-gib", type=float, default=80.0)
    return p


def _dry_run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from vapo_megatron.config import ConfigError, load_config
    from vapo_megatron.planning.dry_run import dry_run
    from vapo_megatron.planning.presets import resolve_arch

    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    world = args.world_size or int(os.environ.get("WORLD_SIZE", "1"))
    spec = args.arch or cfg.model.hf_dir
    if not args.arch and not (Path(spec) / "config.json").is_file():
        print(f"error: model.hf_dir {spec!r} has no config.json on this machine; give the shape with --arch "
              "(e.g. --arch 32B, or a config.json path)", file=sys.stderr)
        return 2
    try:
        arch = resolve_arch(spec)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    result = dry_run(cfg, world, arch, gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib)
    print(result.text, file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 2


def train_main(argv: list[str] | None = None) -> int:
    args = _train_parser().parse_args(argv)
    if args.config is None:
        _train_parser().print_help()
        return 0
    if args.dry_run:
        return _dry_run(args)
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
