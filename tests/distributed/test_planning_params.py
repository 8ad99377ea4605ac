"""The planner's per-rank parameter counts equal what megatron-core allocates for the project's policy (GPTModel)
and critic (trunk + value head), built by the project's own builders: tiny models at TP=PP=1 and at TP=2 x PP=2
(vocabulary padding, a tied output layer's copy on the last stage), and Qwen2.5-32B on the meta device; and for a
tiny Qwen3-MoE shape, megatron-core's own MoE GPTModel (local spec) at tp2 x pp2 x ep2 and tp2 x ep2 x etp2. A failure
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


def _body(tp: int, pp: int, with_32b: bool, with_moe: bool = False) -> dict:
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
    if with_moe:  # in the same spawned run: it sets up its own layouts
        out["moe"] = _moe_counts()
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
    """Also the mixture-of-experts counts of `_moe_counts` (one spawned run for both)."""
    from vapo_megatron.planning.params import stage_params

    results = run_distributed(_body, 4, 2, 2, False, True, timeout=300)
    arch = _moe_arch()
    assert arch.moe_layers == (0, 1, 3)
    for res in results:  # the planner's MoE count (router, QK-norm, local experts over ep, expert width over etp,
        for layout, got in zip(MOE_LAYOUTS, res["moe"]):  # the dense layer of the pattern) is megatron's
            want = stage_params(arch, "policy", pp_rank=got["pp_rank"], **layout)
            assert (got["total"], got["experts"]) == (want.total, want.experts), layout
    for res in results:
        for (name, role), count in res["counts"].items():
            assert count == _expected(name, role, 2, 2, res["pp_rank"]), (name, role, res["pp_rank"])
    tied_last = next(r for r in results if r["pp_rank"] == 1)["counts"][("llama_tied", "policy")]
    assert tied_last > _expected("llama_tied", "critic", 2, 2, 1)  # the tied output layer's copy is there


# A Qwen3-MoE shape for the expert counts: heads and kv heads divide tp 2, experts ep 2, expert width etp 2, layer 2
# dense (mlp_only_layers), vocabulary 131 padded at tp 2.
MOE_LAYOUTS = [dict(tp=2, pp=2, ep=2, etp=1), dict(tp=2, pp=1, ep=2, etp=2)]


def _moe_arch():
    from vapo_megatron.planning.presets import QWEN3_CONFIGS, qwen3_arch_from_config

    return qwen3_arch_from_config(dict(
        QWEN3_CONFIGS["Qwen3-30B-A3B"], vocab_size=131, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=12, intermediate_size=40, moe_intermediate_size=10, num_experts=6,
        num_experts_per_tok=2, mlp_only_layers=[2]))


def _moe_counts() -> list[dict]:
    """Per layout: this rank's (pp rank, all parameters, expert parameters) of megatron-core's own MoE GPTModel
    (local spec: SequentialMLP experts, QK layernorm), built with megatron's decoder block spec."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    from vapo_megatron.models.hf_config import transformer_config
    from vapo_megatron.parallel.layout import ParallelConfig

    arch, out = _moe_arch(), []
    for layout in MOE_LAYOUTS:
        ps.destroy_model_parallel()
        ps.initialize_model_parallel(layout["tp"], layout["pp"], expert_model_parallel_size=layout["ep"],
                                     expert_tensor_parallel_size=layout["etp"], create_gloo_process_groups=True)
        model_parallel_cuda_manual_seed(0)
        parallel = ParallelConfig(tp=layout["tp"], pp=layout["pp"], sequence_parallel=True)
        config = transformer_config(
            arch, parallel, qk_layernorm=True, num_moe_experts=arch.num_experts,
            moe_ffn_hidden_size=arch.moe_ffn_hidden_size, moe_router_topk=arch.moe_topk,
            moe_layer_freq=[int(arch.is_moe_layer(i)) for i in range(arch.num_layers)],
            moe_token_dispatcher_type="alltoall", moe_grouped_gemm=False,
            expert_model_parallel_size=layout["ep"], expert_tensor_parallel_size=layout["etp"])
        model = GPTModel(config, get_gpt_decoder_block_spec(config, use_transformer_engine=False),
                         vocab_size=arch.padded_vocab_size(layout["tp"]), max_sequence_length=64,
                         pre_process=ps.is_pipeline_first_stage(), post_process=ps.is_pipeline_last_stage(),
                         share_embeddings_and_output_weights=arch.tie_word_embeddings,
                         position_embedding_type="rope")
        named = dict(model.named_parameters())
        out.append({"pp_rank": ps.get_pipeline_model_parallel_rank(), "total": sum(p.numel() for p in named.values()),
                    "experts": sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)})
    return out

