"""Demo: build a tiny Qwen2-shaped policy and critic at TP=2 (+ sequence parallel) x PP=2 on 4 gloo ranks,
run one forward/backward of two micro-batches through megatron-core's pipeline schedule and print what each
rank computed. (That these numbers equal TP=PP=1 is what tests/distributed/test_models_parallel.py checks.)
Launched by examples/tiny_cpu/run.sh under torchrun; with 2 ranks it runs TP=2 + SP.
"""
from __future__ import annotations

import os
import tempfile
import time

import torch
import torch.distributed as dist

from vapo_megatron.parallel.layout import ParallelConfig, init_distributed, initialize


def main() -> None:
    init_distributed()
    world = dist.get_world_size()
    tp, pp = (2, 2) if world == 4 else (world, 1)
    parallel = ParallelConfig(tp=tp, pp=pp, sequence_parallel=tp > 1)
    initialize(parallel)
    from safetensors.torch import load_file

    from vapo_megatron.data.rl_batch import MicroBatch
    from vapo_megatron.engine.build import build_model
    from vapo_megatron.engine.schedule import forward_backward
    from vapo_megatron.models.hf_config import load_arch
    from vapo_megatron.models.tiny import save_tiny_hf_model

    hf_dir = os.path.join(tempfile.gettempdir(), "vapo_demo_tiny_qwen2")
    if dist.get_rank() == 0:
        save_tiny_hf_model(hf_dir, "qwen2", seed=0)
    dist.barrier()
    arch = load_arch(hf_dir)
    hf = load_file(os.path.join(hf_dir, "model.safetensors"))
    hf["score.weight"] = torch.randn(1, arch.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.02
    g = torch.Generator().manual_seed(1)
    micro = [MicroBatch(input_ids=torch.randint(3, arch.vocab_size, (2, 32), generator=g)) for _ in range(2)]
    for role in ("policy", "critic"):
        built = build_model(arch, parallel, role, hf_get=hf.__getitem__)
        t0 = time.time()
        stats = forward_backward(built.model, micro, lambda out, mb: (out.float().square().mean(),
                                                                       {"mean_sq": out.detach().square().mean()}),
                                 groups=built.groups)
        if stats:
            print(f"[rank {dist.get_rank()}] {role}: tp={tp} pp={pp} sp={parallel.sequence_parallel} "
                  f"fwd+bwd of {len(micro)} micro-batches in {time.time() - t0:.2f}s; "
                  f"output mean square per micro-batch {[round(float(s['mean_sq']), 5) for s in stats]}", flush=True)
        grad_sq = sum(float(p.main_grad.float().square().sum()) for p in built.model.parameters())
        print(f"[rank {dist.get_rank()}] {role}: local grad sum of squares {grad_sq:.6f}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
