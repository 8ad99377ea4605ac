"""On a CUDA machine: offloading the policy's and critic's training state during generation returns its device
memory (torch.cuda.memory_allocated drops by at least the bytes moved) and training afterwards matches a copy
that was never offloaded, bit for bit. Skips without CUDA; the bookkeeping is tested on CPU in
tests/distributed/test_offload.py. A failure here pinpoints what only a GPU shows: storages that cannot be freed
on the device, pinned copies that are not awaited before the storage goes, or state left resident."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = [pytest.mark.gpu, pytest.mark.distributed,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
VOCAB = 128


def _body(hf_dir: str) -> dict:
    from vapo_megatron import platform
    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import actor_objective, critic_objective, minibatch_counts
    from vapo_megatron.engine.offload import StateOffloader
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import build_engine, synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(), ParallelConfig())
    engines = [{"policy": build_engine(hf_dir, "policy", layouts, params_dtype=torch.bfloat16),
                "critic": build_engine(hf_dir, "critic", layouts, params_dtype=torch.bfloat16)} for _ in range(2)]
    offloader = StateOffloader(engines[1].values(), home=platform.device(), host="cpu")
    alg, hist, drops, moved = AlgorithmConfig(), [[], []], [], []
    dev = platform.device()
    for step in range(2):
        batch = synthetic_rl_batch(8, VOCAB, seed=step).to(dev)
        counts = minibatch_counts(batch)
        for i, e in enumerate(engines):
            c = e["critic"].train_step(batch, critic_objective(alg, counts))
            a = e["policy"].train_step(batch, actor_objective(alg, counts, VOCAB))
            hist[i].append((c["critic/value_loss"], c["critic/grad_norm"], a["policy/pg_loss"], a["policy/grad_norm"]))
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        moved.append(offloader.offload())
        drops.append(before - torch.cuda.memory_allocated())
        offloader.reload()
    weights = [[p.detach().float().cpu() for e in es.values() for p in e.model.parameters()] for es in engines]
    return {"hist": hist, "drops": drops, "moved": moved,
            "weights_equal": all(torch.equal(a, b) for a, b in zip(*weights))}


def test_offload_frees_device_memory_and_training_matches(tmp_path):
    hf_dir = str(save_tiny_hf_model(tmp_path / "qwen2", "qwen2", seed=1))
    r = run_distributed(_body, 1, hf_dir, timeout=300)[0]
    assert r["hist"][0] == r["hist"][1], "training changed by offload/reload"
    assert r["weights_equal"]
    for drop, moved in zip(r["drops"], r["moved"]):
        assert moved > 0 and drop >= moved, f"memory_allocated fell by {drop} bytes, {moved} were offloaded"
