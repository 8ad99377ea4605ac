"""Warm-start the critic on verifier-scored samples of the initial policy (a stand-in for the paper's reward-model
initialisation; vapo_megatron/train/warm_start.py says how), and write a HF critic directory for model.critic_hf_dir.

    python tools/warm_start_critic.py --config examples/tiny_cpu/vapo.yaml --out runs/tiny_cpu/critic_ws
    python tools/warm_start_critic.py --config run.yaml --out critic --samples-per-prompt 16 --steps 600 \\
        rollout.max_response_length=512          # trailing section.field=value overrides of the run config

The run config supplies the policy (model.hf_dir), the prompts (data.train_files), the reward and the lengths.
Prints the report (ev_mc on the fitted and on held-out prompts); then train with model.critic_hf_dir=OUT.
Single process (CPU or one GPU).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

from vapo_megatron.train.warm_start import WarmStartSettings, warm_start_critic


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="warm_start_critic", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the run's YAML config")
    p.add_argument("--out", required=True, help="HF critic directory to write")
    for f in dataclasses.fields(WarmStartSettings):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default,
                       help=f"WarmStartSettings.{f.name} (default {f.default})")
    p.add_argument("overrides", nargs="*", help="section.field=value overrides of the run config")
    return p


def main(argv: list[str] | None = None) -> int:
    from vapo_megatron import platform
    from vapo_megatron.config import load_config

    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    settings = WarmStartSettings(**{f.name: getattr(args, f.name) for f in dataclasses.fields(WarmStartSettings)})
    platform.setup()
    result = warm_start_critic(cfg, settings, args.out)
    print(json.dumps(result.report, indent=1))
    print(f"critic written to {args.out}; train with model.critic_hf_dir={args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
