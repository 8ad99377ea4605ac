"""Per-GPU memory of a VAPO run (policy + critic on megatron-core, colocated with vLLM, or separate placement:
a trainer pool and a rollout pool), by phase, with what to change when it does not fit. The model and the
formulas: vapo_megatron/planning/memory.py.

    python tools/plan_memory.py 32B --nodes 8 --policy tp=8,pp=4,sp,distopt,recompute=full --vllm-tp 8
    python tools/plan_memory.py path/to/config.json --gpus-per-node 8 --policy tp=4,sp --critic none --json
    python tools/plan_memory.py 32B --config examples/qwen2.5-32b/vapo.yaml --nodes 8      # layouts from a run config
    python tools/plan_memory.py Qwen3-30B-A3B --nodes 8 --policy tp=4,pp=2,ep=16,sp,distopt --vllm-tp 4   # MoE
    python tools/plan_memory.py 32B --nodes 8 --policy tp=8,pp=4,sp,distopt --rollout-gpus 32 --vllm-tp 4  # separate

Layout specs are comma-separated: tp=N, pp=N, cp=N, ep=N and etp=N (expert parallel and expert tensor parallel,
mixture-of-experts models), sp (sequence parallel), distopt (distributed optimizer),
recompute=none|selective|full, attention=flash|unfused, grad_bytes=4|2. `--critic` defaults to the policy's
layout; `--critic none` plans value-free training. Exit status: 0 when every phase fits, 1 when one does not.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from vapo_megatron.planning.memory import (
    VLLM_DEFAULT_UTILIZATION,
    VLLM_SEPARATE_UTILIZATION,
    PlanInput,
    RoleSettings,
    RolloutSettings,
    plan_memory,
)
from vapo_megatron.planning.presets import preset_names, qwen3_preset_names, resolve_arch
from vapo_megatron.planning.report import advice, format_plan

_INT_KEYS = ("tp", "pp", "cp", "ep", "etp", "grad_bytes")
_FLAGS = {"sp": "sequence_parallel", "distopt": "distributed_optimizer"}


def parse_layout(spec: str, *, micro_batch_tokens: int, seq_len: int) -> RoleSettings:
    """RoleSettings from "tp=8,pp=4,sp,distopt,recompute=full"; ValueError naming a bad item."""
    values: dict = dict(micro_batch_tokens=micro_batch_tokens, seq_len=seq_len)
    for item in filter(None, (x.strip() for x in spec.split(","))):
        key, _, value = item.partition("=")
        if key in _FLAGS and not value:
            values[_FLAGS[key]] = True
        elif key in _INT_KEYS and value.isdigit():
            values[key] = int(value)
        elif key == "recompute" and value in ("none", "selective", "full"):
            values[key] = value
        elif key == "attention" and value in ("flash", "unfused"):
            values[key] = value
        else:
            raise ValueError(f"layout item {item!r} is not one of tp=N, pp=N, cp=N, ep=N, etp=N, sp, distopt, "
                             "recompute=none|selective|full, attention=flash|unfused, grad_bytes=N")
    return RoleSettings(**values)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help=f"a Qwen2.5 size ({', '.join(preset_names())}), a Qwen3 dense preset "
                   f"({', '.join(qwen3_preset_names(moe=False))}), a Qwen3 mixture-of-experts preset "
                   f"({', '.join(qwen3_preset_names(moe=True))}), an HF directory or a config.json")
    p.add_argument("--config", help="a vapo-train YAML: layouts, lengths, vLLM and optimizer settings from it")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory-gib", type=float, default=80.0)
    p.add_argument("--policy", default="", help="policy layout, e.g. tp=8,pp=4,sp,distopt,recompute=full")
    p.add_argument("--critic", default=None, help="critic layout (default: the policy's; 'none': no critic)")
    p.add_argument("--seq-len", type=int, default=2048 + 20480, help="prompt + response tokens (DAPO: 22528)")
    p.add_argument("--micro-batch-tokens", type=int, default=None, help="tokens per micro-batch (default seq-len)")
    p.add_argument("--vllm-tp", type=int, default=1)
    p.add_argument("--vllm-util", type=float, default=None, help="gpu_memory_utilization (default: "
                   f"{VLLM_DEFAULT_UTILIZATION} colocated, {VLLM_SEPARATE_UTILIZATION} in a rollout pool)")
    p.add_argument("--rollout-gpus", type=int, default=0,
                   help="separate placement: GPUs that run only vLLM (--nodes are then the trainer pool's; with "
                   "--config, rollout.rollout_ranks of --nodes x --gpus-per-node)")
    p.add_argument("--batch-sequences", type=int, default=512 * 16,
                   help="sequences of one rollout batch (num_prompts x n), checked against a rollout pool's KV cache")
    p.add_argument("--offload", action="store_true", help="Megatron offloaded to host during generation")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--overhead-gib", type=float, default=3.0, help="CUDA context, NCCL, allocator slack")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def _plan_input(args: argparse.Namespace) -> PlanInput:
    arch = resolve_arch(args.model)
    if args.config:
        from vapo_megatron.config import load_config
        from vapo_megatron.planning.dry_run import plan_input_from_config

        cfg = load_config(args.config)
        return plan_input_from_config(cfg, args.nodes * args.gpus_per_node, arch, gpus_per_node=args.gpus_per_node,
                                      gpu_memory_gib=args.gpu_memory_gib)
    tokens = args.micro_batch_tokens or args.seq_len
    policy = parse_layout(args.policy, micro_batch_tokens=tokens, seq_len=args.seq_len)
    critic = None if args.critic == "none" else (
        policy if args.critic is None else parse_layout(args.critic, micro_batch_tokens=tokens, seq_len=args.seq_len))
    util = args.vllm_util or (VLLM_SEPARATE_UTILIZATION if args.rollout_gpus else VLLM_DEFAULT_UTILIZATION)
    rollout = RolloutSettings(vllm_tp=args.vllm_tp, gpu_memory_utilization=util, max_seq_len=args.seq_len,
                              offload_megatron=args.offload, batch_sequences=args.batch_sequences)
    return PlanInput(arch=arch, policy=policy, critic=critic, rollout=rollout, nodes=args.nodes,
                     gpus_per_node=args.gpus_per_node, gpu_memory_gib=args.gpu_memory_gib,
                     overhead_gib=args.overhead_gib, param_bytes=2 if args.dtype == "bf16" else 4,
                     rollout_gpus=args.rollout_gpus)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        inp = _plan_input(args)
        plan = plan_memory(inp)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        out = plan.to_dict()
        out["inputs"]["arch"] = dataclasses.asdict(inp.arch)
        out["advice"] = advice(plan)
        print(json.dumps(out, indent=2))
    else:
        print(format_plan(plan))
    return 0 if plan.fits else 1


if __name__ == "__main__":
    sys.exit(main())
