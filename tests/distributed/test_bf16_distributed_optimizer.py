"""bf16 parameters with fp32 master weights through megatron-core's distributed optimizer (model.dtype=bfloat16 +
use_distributed_optimizer) at DP=2: the engine builds a DistributedOptimizer whose main-parameter shards and Adam
moments are fp32 while the model's parameters are bf16 (norm weights excepted: megatron builds plain-torch norms
in fp32), one step trains (finite, not skipped, loss on the same
batch goes down), and after the step every bf16 parameter equals the bf16 rounding of the fp32 master weights
gathered from both ranks. A failure pinpoints the mixed-precision wiring: bf16 master weights (updates lost to
rounding) or master weights not copied back into the model."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB = 128


def _body(hf_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_loss_fn
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch
    from vapo_megatron.trainer_parts import minibatch_counts

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    eng = build_engine(hf_dir, "policy", layouts, params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    batch = synthetic_rl_batch(8, VOCAB, seed=2)
    loss_fn = actor_loss_fn(AlgorithmConfig(positive_lm_coef=1.0), minibatch_counts(batch), VOCAB)
    steps = [eng.train_step(batch, loss_fn) for _ in range(3)]
    inner = eng.optimizer.chained_optimizers
    shards = [t for o in inner for g in o.shard_fp32_from_float16_groups for t in g]
    moments = [v for o in inner for st in o.optimizer.state.values() for k, v in st.items() if k != "step"]
    # master weights: each rank's fp32 shard written into its range of a flat copy, summed over DP (the loop
    # runs over all parameters on every rank: a rank owns shards of only some of them)
    owned = {id(p): (o, shard) for o in inner for mg, sg in zip(o.model_float16_groups,
             o.shard_fp32_from_float16_groups) for p, shard in zip(mg, sg)}
    master = []
    for p in (p for p in eng.model.parameters() if p.dtype == torch.bfloat16):
        flat = torch.zeros(p.numel(), dtype=torch.float32)
        if id(p) in owned:
            o, shard = owned[id(p)]
            r = o._get_model_param_range_map(p)["param"]
            flat[r.start:r.end] = shard
        dist.all_reduce(flat)
        master.append((p, flat.view(p.shape)))
    return {"types": sorted({type(o).__name__ for o in inner}),
            "dist_opt": all(isinstance(o, DistributedOptimizer) for o in inner),
            "param_dtypes": sorted({str(p.dtype) for p in eng.model.parameters()}),
            "fp32_params": [n for n, p in eng.model.named_parameters() if p.dtype == torch.float32],
            "shard_dtypes": sorted({str(t.dtype) for t in shards}),
            "moment_dtypes": sorted({str(v.dtype) for v in moments}),
            "losses": [s["policy_loss"] + s.get("nll_loss", 0.0) for s in steps],
            "skipped": [s["skipped"] for s in steps],
            "copied_back": all(torch.equal(p.detach(), m.to(torch.bfloat16)) for p, m in master)}


def test_bf16_params_fp32_master_weights_distributed_optimizer(tmp_path):
    hf_dir = str(save_tiny_hf_model(tmp_path / "qwen2", "qwen2", seed=1))
    for rank, r in enumerate(run_distributed(_body, 2, hf_dir, timeout=300)):
        assert r["dist_opt"], f"rank {rank}: not megatron's DistributedOptimizer: {r['types']}"
        # megatron's plain-torch norms (local spec without TE/apex) are built in fp32 whatever params_dtype is;
        # the distributed optimizer then steps them directly as fp32 parameters. Everything else is bf16.
        assert all("layernorm" in n or "final_norm" in n for n in r["fp32_params"]), r["fp32_params"]
        assert "torch.bfloat16" in r["param_dtypes"]
        assert r["shard_dtypes"] == ["torch.float32"] and r["moment_dtypes"] == ["torch.float32"], r
        assert r["skipped"] == [0.0, 0.0, 0.0] and r["losses"][2] < r["losses"][0], r["losses"]
        assert r["copied_back"], f"rank {rank}: bf16 params are not the rounded fp32 master weights"
