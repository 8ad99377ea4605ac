"""bf16 parameters with fp32 master weights through megatron-core's distributed optimizer (model.dtype=bfloat16 +
use_distributed_optimizer) at DP=2: the engine builds a DistributedOptimizer whose main-parameter shards and Adam
moments are fp32 while every model parameter is bf16 (norm weights included: platform/cpu.py S6 builds the
plain-torch norms in params_dtype), one step trains (finite, not skipped, loss on the same batch goes down), and
after the step every bf16 parameter equals the bf16 rounding of the fp32 master weights gathered from both ranks.
A failure pinpoints the mixed-precision wiring: bf16 master weights (updates lost to rounding) or master weights
not copied back into the model.

In the same spawn, a training checkpoint of the bf16 model round-trips with the distributed optimizer and with
the plain one (Float16OptimizerWithFloat16Params): save, one more step, load; the model parameters, fp32 main
parameters and Adam state are then equal to those at the save. megatron-core's optimizer state dicts index the
parameters of a group as if they all had one dtype; fp32 norms in a bf16 model made the save fail with both
optimizers ("Optimizer shape (128,) does not match model shape (256,)", "size of tensor a (256) must match
... (128)" in get_parameter_state_dp_zero)."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB = 128


def _snapshot(eng) -> list[torch.Tensor]:
    """Model parameters, then the inner torch optimizer's parameters (fp32 main params / shards) and their Adam
    state, in param-group order (this rank's view)."""
    out = [p.detach().clone() for p in eng.model.parameters()]
    for o in getattr(eng.optimizer, "chained_optimizers", [eng.optimizer]):
        for g in o.optimizer.param_groups:
            for p in g["params"]:
                st = o.optimizer.state.get(p, {})
                out += [p.detach().clone()] + [torch.as_tensor(st[k]).clone() for k in sorted(st)]
    return out


def _round_trip(eng, batch, loss_fn, run_dir: str) -> dict:
    """Save, train one more step (changes weights and state), load: equal to the snapshot at the save?"""
    from vapo_megatron.engine.checkpoint import load_checkpoint, save_checkpoint

    saved = _snapshot(eng)
    ckpt = save_checkpoint(run_dir, 1, {"policy": eng}, {"step": 1})
    eng.train_step(batch, loss_fn)
    moved = not all(torch.equal(a, b) for a, b in zip(saved, _snapshot(eng)))
    load_checkpoint(ckpt, {"policy": eng})
    loaded = _snapshot(eng)
    return {"n": (len(saved), len(loaded)), "moved": moved,
            "equal": len(saved) == len(loaded) and all(a.dtype == b.dtype and torch.equal(a, b)
                                                       for a, b in zip(saved, loaded))}


def _body(hf_dir: str, run_dir: str) -> dict:
    import torch.distributed as dist
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, minibatch_counts
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    eng = build_engine(hf_dir, "policy", layouts, params_dtype=torch.bfloat16, use_distributed_optimizer=True)
    batch = synthetic_rl_batch(8, VOCAB, seed=2)
    loss_fn = actor_objective(AlgorithmConfig(positive_lm_coef=1.0), minibatch_counts(batch), VOCAB)
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
    # the plain optimizer (Float16OptimizerWithFloat16Params at DP=2), one step so that Adam has moments
    plain = build_engine(hf_dir, "policy", layouts, params_dtype=torch.bfloat16, use_distributed_optimizer=False)
    plain.train_step(batch, loss_fn)
    return {"types": sorted({type(o).__name__ for o in inner}),
            "dist_opt": all(isinstance(o, DistributedOptimizer) for o in inner),
            "param_dtypes": sorted({str(p.dtype) for p in eng.model.parameters()}),
            "fp32_params": [n for n, p in eng.model.named_parameters() if p.dtype == torch.float32],
            "shard_dtypes": sorted({str(t.dtype) for t in shards}),
            "moment_dtypes": sorted({str(v.dtype) for v in moments}),
            "losses": [s["policy/pg_loss"] + s["policy/nll_loss"] for s in steps],
            "skipped": [s["policy/skipped"] for s in steps],
            "copied_back": all(torch.equal(p.detach(), m.to(torch.bfloat16)) for p, m in master),
            "ckpt_distributed": _round_trip(eng, batch, loss_fn, f"{run_dir}/distributed"),
            "ckpt_plain": _round_trip(plain, batch, loss_fn, f"{run_dir}/plain")}


def test_bf16_params_fp32_master_weights_distributed_optimizer(tmp_path):
    hf_dir = str(save_tiny_hf_model(tmp_path / "qwen2", "qwen2", seed=1))
    for rank, r in enumerate(run_distributed(_body, 2, hf_dir, str(tmp_path / "run"), timeout=300)):
        assert r["dist_opt"], f"rank {rank}: not megatron's DistributedOptimizer: {r['types']}"
        # one dtype for all parameters, norms included (megatron's optimizer state dicts assume it)
        assert r["fp32_params"] == [] and r["param_dtypes"] == ["torch.bfloat16"], r["fp32_params"]
        assert r["shard_dtypes"] == ["torch.float32"] and r["moment_dtypes"] == ["torch.float32"], r
        assert r["skipped"] == [0.0, 0.0, 0.0] and r["losses"][2] < r["losses"][0], r["losses"]
        assert r["copied_back"], f"rank {rank}: bf16 params are not the rounded fp32 master weights"
        for kind in ("distributed", "plain"):
            c = r[f"ckpt_{kind}"]
            assert c["moved"], f"rank {rank}, {kind} optimizer: the step after the save changed nothing"
            assert c["equal"], f"rank {rank}, {kind} optimizer: state after load != state at save ({c['n']})"
