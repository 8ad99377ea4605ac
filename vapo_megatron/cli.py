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
    p.add_argument("--resume", nargs="?", const="latest", default=None, choices=("latest", "previous"),
                   help="continue from the newest checkpoint in the run dir, after verifying its checksums; "
                        "--resume=previous: from the newest older one that verifies (each skipped one is printed)")
    p.add_argument("--overwrite", action="store_true",
                   help="start afresh in a run dir that holds checkpoints or metrics, deleting them (without it, "
                        "such a run dir is refused unless --resume is given)")
    p.add_argument("--debug", action="store_true",
                   help="show the traceback of user errors (config, data, reward, run dir) too; also VAPO_DEBUG=1")
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


def _train(args: argparse.Namespace) -> int:
    import os

    from vapo_megatron.config import load_config, validate
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.train.loop import train
    from vapo_megatron.train.preflight import preflight

    cfg = load_config(args.config, args.overrides)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for key in ("model.hf_dir", "model.critic_hf_dir"):  # before anything reads the model or builds one
        _check_model_dir(key, getattr(cfg.model, key.split(".")[1]))
    arch = load_arch(cfg.model.hf_dir) if cfg.model.hf_dir else None
    critic_arch = load_arch(cfg.model.critic_hf_dir) if cfg.model.critic_hf_dir else None
    validate(cfg, world, arch, critic_arch)
    preflight(cfg, resume=bool(args.resume), overwrite=args.overwrite, is_rank0=_rank() == 0)
    resume = args.resume
    if resume:  # verified before any model is built; the trainer loads exactly this checkpoint
        from vapo_megatron.engine.resume import select_resume_checkpoint
        from vapo_megatron.parallel.layout import init_distributed

        init_distributed()
        resume = select_resume_checkpoint(cfg.checkpoint.run_dir, resume)
    train(cfg, resume=resume)
    return 0


def _check_model_dir(key: str, hf_dir: str | None) -> None:
    """A PreflightError when the model directory is missing or holds no config.json or no safetensors weights
    (a traceback used to come from the first reader, after the models were partly built)."""
    from pathlib import Path

    from vapo_megatron.convert.hf_io import INDEX_FILE, SINGLE_FILE
    from vapo_megatron.errors import PreflightError

    if not hf_dir:
        return
    path = Path(hf_dir)
    if not path.is_dir():
        raise PreflightError(f"{key}={hf_dir!r} does not exist (or is not a directory)")
    if not (path / "config.json").is_file():
        raise PreflightError(f"{key}={hf_dir!r} is not a Hugging Face model directory (no config.json)")
    if not ((path / SINGLE_FILE).is_file() or (path / INDEX_FILE).is_file()):
        other = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth"))
        raise PreflightError(f"{key}={hf_dir!r} has no weights: neither {SINGLE_FILE} nor {INDEX_FILE}"
                             + (f" (found {other}: convert them to safetensors first)" if other else ""))


def _install_platform_shims() -> None:
    """The entry points install the CPU shims for megatron-core once, before anything imports it (no module
    does so as an import side effect; nothing happens on CUDA)."""
    from vapo_megatron import platform

    platform.install_shims()


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))


def _user_errors() -> tuple[type[BaseException], ...]:
    from vapo_megatron.config import ConfigError
    from vapo_megatron.data.datasets import DatasetFormatError
    from vapo_megatron.errors import UserError

    return UserError, ConfigError, DatasetFormatError


def train_main(argv: list[str] | None = None) -> int:
    """`vapo-train`: exit 0 on success; on a user error (module errors.UserError, config, data) one message on
    rank 0 and exit 1, with the traceback only under --debug / VAPO_DEBUG=1; internal errors raise as they are."""
    import os

    _install_platform_shims()
    argv = sys.argv[1:] if argv is None else list(argv)
    # a bare --resume never takes the next word as its value (`--resume train.steps=10` keeps the override)
    args = _train_parser().parse_intermixed_args(["--resume=latest" if a == "--resume" else a for a in argv])
    if args.config is None and not args.overrides:  # overrides alone are a whole config (defaults + overrides)
        _train_parser().print_help()
        return 0
    if args.dry_run:
        return _dry_run(args)
    try:
        return _train(args)
    except _user_errors() as exc:
        if args.debug or os.environ.get("VAPO_DEBUG", "") not in ("", "0"):
            raise
        if _rank() == 0:
            print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1


def generate_main(argv: list[str] | None = None) -> int:
    _install_platform_shims()
    from vapo_megatron.rollout.generate import generate_main as run

    return run(argv)


if __name__ == "__main__":
    sys.exit(train_main())
