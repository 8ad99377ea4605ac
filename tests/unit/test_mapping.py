"""The HF <-> Megatron mapping against an obviously correct per-head reference, and shard round trips.
A failure pinpoints a wrong fused layout (QKV group order, gate/up halves) or a lossy TP split."""
import pytest
import torch

from vapo_megatron.convert.mapping import (
    GLU,
    QKV,
    full_shape,
    full_to_hf,
    hf_to_full,
    merge_tp,
    param_maps,
    shard_state_dict,
    split_tp,
    stages_of,
)
from vapo_megatron.models.hf_config import arch_from_hf
from vapo_megatron.models.tiny import tiny_hf_config


def _arch(**kw):
    return arch_from_hf(tiny_hf_config(**kw))


def _random_hf(arch, role="policy"):
    g = torch.Generator().manual_seed(0)
    out = {}
    for pm in param_maps(arch, role):
        if pm.kind == QKV:
            tail = (arch.hidden_size,) if pm.name.endswith("weight") else ()
            rows = [arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim,
                    arch.num_kv_heads * arch.head_dim]
            for n, r in zip(pm.hf_names, rows):
                out[n] = torch.randn(r, *tail, generator=g)
        elif pm.kind == GLU:
            for n in pm.hf_names:
                out[n] = torch.randn(arch.ffn_hidden_size, arch.hidden_size, generator=g)
        else:
            out[pm.hf_names[0]] = torch.randn(full_shape(pm, arch), generator=g)
    return out


@pytest.mark.parametrize("heads,kv", [(4, 2), (4, 1), (4, 4)])
def test_qkv_fusion_matches_per_group_reference(heads, kv):
    arch = _arch(num_heads=heads, num_kv_heads=kv)
    hf = _random_hf(arch)
    pm = next(p for p in param_maps(arch) if p.name.endswith("0.self_attention.linear_qkv.weight"))
    fused = hf_to_full(pm, hf, arch)
    q, k, v = (hf[n] for n in pm.hf_names)
    d, per = arch.head_dim, heads // kv
    rows = []
    for group in range(kv):  # reference: written from megatron's documented per-group order
        for h in range(group * per, (group + 1) * per):
            rows.append(q[h * d:(h + 1) * d])
        rows.append(k[group * d:(group + 1) * d])
        rows.append(v[group * d:(group + 1) * d])
    assert torch.equal(fused, torch.cat(rows))
    assert all(torch.equal(full_to_hf(pm, fused, arch)[n], hf[n]) for n in pm.hf_names)


@pytest.mark.parametrize("family,tie", [("qwen2", False), ("llama", True)])
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_hf_round_trip_is_exact(family, tie, role):
    arch = _arch(family=family, tie_word_embeddings=tie)
    hf = _random_hf(arch, role)
    back = {}
    for pm in param_maps(arch, role):
        back.update(full_to_hf(pm, hf_to_full(pm, hf, arch), arch))
    assert back.keys() == hf.keys()
    assert all(torch.equal(back[k], hf[k]) for k in hf)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tp_split_merge_round_trip_and_glu_halves(tp):
    arch = _arch(vocab_size=126, num_heads=4, num_kv_heads=4)  # 126 is not a multiple of 4: padding path
    hf = _random_hf(arch)
    for pm in param_maps(arch):
        full = hf_to_full(pm, hf, arch)
        shards = split_tp(pm, full, tp, arch)
        assert len(shards) == tp
        assert torch.equal(merge_tp(pm, shards, arch), full)
        if pm.kind == GLU:  # rank r holds [gate_r; up_r]
            gate, up = (hf[n] for n in pm.hf_names)
            for r, s in enumerate(shards):
                assert torch.equal(s, torch.cat([gate.chunk(tp)[r], up.chunk(tp)[r]]))
        if pm.vocab:
            assert sum(s.shape[0] for s in shards) == arch.padded_vocab_size(tp)


def test_pipeline_stages_cover_every_parameter_once():
    arch = _arch(num_layers=4, tie_word_embeddings=True, family="llama")
    full = {pm.name: hf_to_full(pm, _random_hf(arch), arch) for pm in param_maps(arch)}
    stage_dicts = [shard_state_dict(full, arch, role="policy", tp=1, tp_rank=0, pp=2, pp_rank=s) for s in (0, 1)]
    assert "decoder.layers.1.mlp.linear_fc1.weight" in stage_dicts[1]  # global layer 3 -> local 1
    assert torch.equal(stage_dicts[1]["decoder.layers.1.mlp.linear_fc1.weight"],
                       full["decoder.layers.3.mlp.linear_fc1.weight"])
    assert torch.equal(stage_dicts[1]["output_layer.weight"], full["embedding.word_embeddings.weight"])
    emb = next(pm for pm in param_maps(arch) if pm.vocab)
    assert stages_of(emb, arch, 2, "critic") == [0]
