"""Qwen3 and Qwen3-MoE configs -> ModelArch -> megatron fields, the MoE parameter mapping and expert placement,
and the validation of expert-parallel layouts. A failure pinpoints a misread HF field (head_dim, the dense-layer
pattern, norm_topk_prob), an expert held by the wrong EP rank or split over the wrong group, or a layout that
should have been refused with its numbers."""
import pytest
import torch

from vapo_megatron.convert.mapping import full_shape, full_to_hf, hf_to_full, param_maps, shard_state_dict
from vapo_megatron.models.hf_config import arch_from_hf, moe_fields
from vapo_megatron.models.tiny import tiny_hf_config
from vapo_megatron.parallel.layout import ParallelConfig, ParallelConfigError


def _moe(**kw):
    return arch_from_hf(tiny_hf_config("qwen3_moe", hidden_size=64, num_heads=4, num_kv_heads=2, head_dim=48, **kw))


def test_qwen3_dense_fields():
    arch = arch_from_hf(tiny_hf_config("qwen3", hidden_size=64, num_heads=4, head_dim=48, tie_word_embeddings=True))
    assert (arch.family, arch.head_dim, arch.qk_norm, arch.qkv_bias, arch.tie_word_embeddings) == \
        ("qwen3", 48, True, False, True)
    assert not arch.is_moe
    names = {pm.name: pm.hf_names for pm in param_maps(arch)}
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"] == ("model.layers.0.self_attn.q_norm.weight",)
    assert "output_layer.weight" not in names  # tied


@pytest.mark.parametrize("step,dense_only,expected", [(1, [1], (0, 2, 3)), (2, [], (1, 3)), (2, [3], (1,))])
def test_moe_layer_pattern_follows_hf(step, dense_only, expected):
    """HF: layer i is MoE iff i not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0."""
    from transformers import Qwen3MoeForCausalLM

    cfg = tiny_hf_config("qwen3_moe", hidden_size=64, num_heads=4, head_dim=16, decoder_sparse_step=step,
                         mlp_only_layers=dense_only)
    arch = arch_from_hf(cfg)
    assert arch.moe_layers == expected
    with torch.device("meta"):
        hf = Qwen3MoeForCausalLM(cfg)
    assert tuple(i for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")) == expected
    freq = moe_fields(arch, ParallelConfig())["moe_layer_freq"]
    assert freq == [1 if i in expected else 0 for i in range(arch.num_layers)]


@pytest.mark.parametrize("norm", [True, False])
def test_routing_fields(norm):
    fields = moe_fields(_moe(norm_topk_prob=norm, num_experts=6, num_experts_per_tok=3), ParallelConfig(ep=2))
    assert fields["moe_router_pre_softmax"] is (not norm)  # softmax over all experts first = no renormalisation
    assert (fields["num_moe_experts"], fields["moe_router_topk"], fields["expert_model_parallel_size"]) == (6, 3, 2)
    assert fields["moe_aux_loss_coeff"] == pytest.approx(0.001)


def test_experts_are_placed_on_their_ep_rank_and_split_over_expert_tp():
    arch = _moe(num_experts=4, moe_intermediate_size=32)
    g = torch.Generator().manual_seed(0)
    full = {pm.name: torch.randn(full_shape(pm, arch), generator=g) for pm in param_maps(arch)}
    for ep_rank in range(2):
        local = shard_state_dict(full, arch, role="policy", tp=2, tp_rank=1, pp=1, pp_rank=0, ep=2, ep_rank=ep_rank,
                                 etp=1, etp_rank=0)
        for local_e in range(2):
            e = ep_rank * 2 + local_e
            name = f"decoder.layers.0.mlp.experts.local_experts.{local_e}.linear_fc1.weight"
            assert torch.equal(local[name], full[f"decoder.layers.0.mlp.experts.local_experts.{e}.linear_fc1.weight"])
        assert "decoder.layers.0.mlp.experts.local_experts.2.linear_fc1.weight" not in local
        assert torch.equal(local["decoder.layers.0.mlp.router.weight"], full["decoder.layers.0.mlp.router.weight"])
        # attention is split over TP (rank 1 holds the second half of the QKV groups)
        qkv = full["decoder.layers.0.self_attention.linear_qkv.weight"]
        assert torch.equal(local["decoder.layers.0.self_attention.linear_qkv.weight"], qkv.chunk(2)[1])
    halves = shard_state_dict(full, arch, role="policy", tp=1, tp_rank=0, pp=1, pp_rank=0, ep=1, ep_rank=0,
                              etp=2, etp_rank=1)
    fc2 = full["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"]
    assert torch.equal(halves["decoder.layers.0.mlp.experts.local_experts.3.linear_fc2.weight"], fc2.chunk(2, 1)[1])


def test_expert_tensors_round_trip():
    arch = _moe(num_experts=3, moe_intermediate_size=24)
    pm = next(p for p in param_maps(arch) if p.name.endswith("local_experts.2.linear_fc1.weight"))
    assert pm.hf_names == tuple(f"model.layers.0.mlp.experts.2.{p}_proj.weight" for p in ("gate", "up"))
    hf = {n: torch.randn(24, 64) for n in pm.hf_names}
    fused = hf_to_full(pm, hf, arch)
    assert fused.shape == (48, 64)
    assert all(torch.equal(full_to_hf(pm, fused, arch)[n], hf[n]) for n in pm.hf_names)


@pytest.mark.parametrize("layout,world,needle", [
    (dict(ep=3), 6, "num_experts 4 is not divisible by ep 3"),
    (dict(ep=2, etp=2), 2, "world size 2 is not divisible by etp(2) x ep(2) x pp(1) = 4"),
    (dict(tp=2, ep=2), 2, "at tp=2 needs sequence_parallel"),
    (dict(etp=3), 3, "moe_intermediate_size 64 is not divisible by etp 3"),
    (dict(cp=2), 2, "context parallelism (cp=2) with a mixture-of-experts model"),
])
def test_impossible_expert_layouts_quote_numbers(layout, world, needle):
    with pytest.raises(ParallelConfigError) as err:
        ParallelConfig(**layout).validate(world, num_experts=4, moe_ffn_hidden_size=64, num_heads=4, num_kv_heads=2)
    assert needle in str(err.value)


def test_expert_parallel_on_a_dense_model_is_refused():
    with pytest.raises(ParallelConfigError, match="ep=2 / etp=1 need a mixture-of-experts model"):
        ParallelConfig(ep=2).validate(2, num_experts=0)
