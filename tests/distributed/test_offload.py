"""Offloading Megatron's training state (rollout.offload_megatron_during_rollout) with the real mover on CPU.

Two copies of the policy (fp32) and critic (bf16) are trained side by side on the same batches; one copy is
offloaded and reloaded after every step, with home="cpu" so that every storage is really freed (resized to 0
bytes) and restored. Checked: after `offload()` no parameter, main_grad (DDP grad buffer), fp32 main param or
distributed-optimizer shard, and no Adam moment still holds bytes (a tensor the mover missed); after three steps
losses, grad norms, weights and Adam state equal the copy never offloaded bit for bit (a view that went stale
or bytes restored into the wrong storage). Run at 1 rank (megatron's plain optimizers) and at DP=2 (the
distributed optimizer, whose fp32 shards are views into DDP's param buffer). What only a GPU shows - device
memory actually returned - is tests/gpu/test_offload_cuda.py."""
from __future__ import annotations

import logging

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB = 128


def resident_tensors(engines: dict) -> list[str]:
    """Names of the training-state tensors that still hold bytes, found through megatron's own attributes
    (not through the mover's traversal)."""
    found = []
    for role, eng in engines.items():
        for name, p in eng.model.module.named_parameters():
            for label, t in ((name, p), (f"{name}.main_grad", getattr(p, "main_grad", None)),
                             (f"{name}.main_param", getattr(p, "main_param", None))):
                if t is not None and t.untyped_storage().nbytes() > 0:
                    found.append(f"{role}:{label}")
        for o in getattr(eng.optimizer, "chained_optimizers", [eng.optimizer]):
            for attr in ("fp32_from_float16_groups", "shard_fp32_from_float16_groups", "shard_fp32_groups"):
                for i, t in enumerate(t for g in getattr(o, attr, []) for t in g if t is not None):
                    if t.untyped_storage().nbytes() > 0:
                        found.append(f"{role}:{attr}[{i}]")
            for i, st in enumerate(o.optimizer.state.values()):
                found += [f"{role}:state[{i}].{k}" for k, v in st.items()
                          if isinstance(v, torch.Tensor) and v.untyped_storage().nbytes() > 0]
    return found


def _snapshot(engines: dict) -> dict:
    out = {}
    for role, eng in engines.items():
        out[f"{role}.weights"] = [p.detach().clone() for p in eng.model.parameters()]
        out[f"{role}.adam"] = [v.detach().clone() for o in getattr(eng.optimizer, "chained_optimizers", [])
                               for st in o.optimizer.state.values() for v in st.values()
                               if isinstance(v, torch.Tensor)]
    return out


def _body(hf_dir: str, distributed_optimizer: bool) -> dict:
    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, critic_objective, minibatch_counts
    from vapo_megatron.engine.offload import StateOffloader
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    kw = dict(use_distributed_optimizer=distributed_optimizer)

    def make():
        return {"policy": build_engine(hf_dir, "policy", layouts, **kw),
                "critic": build_engine(hf_dir, "critic", layouts, params_dtype=torch.bfloat16, **kw)}

    ref, off = make(), make()
    offloader = StateOffloader(off.values(), home="cpu", host="cpu", pin_memory=False)
    alg, hist, resident, moved = AlgorithmConfig(), {"ref": [], "off": []}, [], []
    for step in range(3):
        batch = synthetic_rl_batch(8, VOCAB, seed=step)
        counts = minibatch_counts(batch)
        for name, engines in (("ref", ref), ("off", off)):
            c = engines["critic"].train_step(batch, critic_objective(alg, counts))
            a = engines["policy"].train_step(batch, actor_objective(alg, counts, VOCAB))
            hist[name].append((c["critic/value_loss"], c["critic/grad_norm"], a["policy/pg_loss"],
                               a["policy/grad_norm"]))
        moved.append(offloader.offload())
        resident.append(resident_tensors(off))
        offloader.reload()
    a, b = _snapshot(ref), _snapshot(off)
    equal = {k: all(torch.equal(x, y) for x, y in zip(a[k], b[k])) and len(a[k]) == len(b[k]) for k in a}
    return {"hist": hist, "resident": resident, "moved": moved, "equal": equal, "n_adam": len(a["policy.adam"])}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1))


@pytest.mark.parametrize("world,distributed_optimizer", [(1, False), (2, True)])
def test_offload_reload_is_invisible_to_training(hf_dir, world, distributed_optimizer):
    results = run_distributed(_body, world, hf_dir, distributed_optimizer, timeout=300)
    for rank, r in enumerate(results):
        missed = sorted({name for names in r["resident"] for name in names})
        assert not missed, f"rank {rank}: {len(missed)} tensors not offloaded, e.g. {missed[:8]}"
        assert r["hist"]["off"] == r["hist"]["ref"], f"rank {rank}: training changed by offload/reload"
        assert all(r["equal"].values()), f"rank {rank}: state differs after offload/reload: {r['equal']}"
        assert r["n_adam"] > 0 and r["moved"][0] > 0


def test_switch_without_cuda_is_a_logged_no_op(caplog):
    """On a machine without CUDA the trainer's switch moves nothing and says so once (issue 5)."""
    from vapo_megatron import platform
    from vapo_megatron.engine.offload import rollout_offloader

    if platform.has_cuda():
        pytest.skip("CUDA present: the switch offloads for real (tests/gpu/test_offload_cuda.py)")
    caplog.set_level(logging.INFO, logger="vapo_megatron.engine.offload")
    off = rollout_offloader([], enabled=True)
    for _ in range(2):
        with off.offloaded():
            pass
    assert sum("no CUDA device" in r.message for r in caplog.records) <= 1
