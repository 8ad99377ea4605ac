"""The planner's per-rank parameter counts equal what megatron-core allocates for the project's policy (GPTModel)
and critic (trunk + value head), built by the project's own builders: tiny models at TP=PP=1 and at TP=2 x PP=2
(vocabulary padding, a tied output layer's copy on the last stage), and Qwen2.5-32B on the meta device. A failure
means the memory planner counts a tensor megatron does not build, or misses one (its memory plans are then off)."""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed


def _tiny_archs():
    from vapo_megatron.models.hf_config import arch_from_hf
    from vapo_megatron.models.tiny import tiny_hf_config

    # vocab 131: padded to 132 at tp=2; the tied llama exercises megatron's output-layer copy at pp>1.
    return {"qwen2_untied": arch_from_hf(tiny_hf_config("qwen2", vocab_size=131, num_layers=4)),
            "llama_tied": arch_from_hf(tiny_hf_config("llama", vocab_size=131, num_layers=4,
                                                      tie_word_embeddings=True))}


def _count(arch, tp: int, pp: int, role: str, dtype=torch.float32) -> int:
    from megatron.core import parallel_state as ps

    from vapo_megatron.models.critic import build_critic
    from vapo_megatron.models.hf_config import transformer_config
    from vapo_megatron.models.policy import build_policy
    from vapo_megatron.parallel.layout import ParallelConfig

    config = transformer_config(arch, ParallelConfig(tp=tp, pp=pp), params_dtype=dtype)
    build = build_policy if role == "policy" else build_critic
    model = build(arch, config, pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage())
    return sum(p.numel() for p in model.parameters())


def _body(tp: int, pp: int, with_32b: bool) -> dict:
    from megatron.core import parallel_state as ps

    from vapo_megatron.parallel.layout import ParallelConfig, initialize

    initialize(ParallelConfig(tp=tp, pp=pp))
    out = {"pp_rank": ps.get_pipeline_model_parallel_rank(), "counts": {}}
    for name, arch in _tiny_archs().items():
        for role in ("policy", "critic"):
            out["counts"][(name, role)] = _count(arch, tp, pp, role)
    if with_32b:
        from vapo_megatron.planning.presets import qwen25_arch

        with torch.device("meta"):  # 32.8e9 parameters, no memory
            for role in ("policy", "critic"):
                out["counts"][("32B", role)] = _count(qwen25_arch("32B"), tp, pp, role, torch.bfloat16)
    return out


def _expected(name: str, role: str, tp: int, pp: int, pp_rank: int) -> int:
    from vapo_megatron.planning.params import stage_params
    from vapo_megatron.planning.presets import qwen25_arch

    arch = qwen25_arch("32B") if name == "32B" else _tiny_archs()[name]
    return stage_params(arch, role, tp=tp, pp=pp, pp_rank=pp_rank).total


def test_counts_single_rank_and_32b_on_meta():
    from vapo_megatron.planning.params import total_params
    from vapo_megatron.planning.presets import qwen25_arch

    (result,) = run_distributed(_body, 1, 1, 1, True, timeout=300)
    for (name, role), count in result["counts"].items():
        assert count == _expected(name, role, 1, 1, 0), (name, role)
    assert result["counts"][("32B", "policy")] == total_params(qwen25_arch("32B"))  # 152064 divides by 1: no pad
    assert 32.7e9 < result["counts"][("32B", "policy")] < 32.9e9


def test_counts_per_rank_at_tp2_pp2():
    results = run_distributed(_body, 4, 2, 2, False, timeout=300)
    for res in results:
        for (name, role), count in res["counts"].items():
            assert count == _expected(name, role, 2, 2, res["pp_rank"]), (name, role, res["pp_rank"])
    tied_last = next(r for r in results if r["pp_rank"] == 1)["counts"][("llama_tied", "policy")]
    assert tied_last > _expected("llama_tied", "critic", 2, 2, 1)  # the tied output layer's copy is there
