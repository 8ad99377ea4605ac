"""The memory planner's formulas against hand-derived numbers: the activation term reduces to Korthikanti et al.'s
sbh(34 + 5as/h) (less the dropout masks) for a GPT-shaped layer, TP/SP/CP/PP/recompute scale it as the paper
says, the optimizer shards over DP, the vLLM KV cache per token is 2 x layers x kv_heads x head_dim x 2 bytes. A
failure names the term that drifted."""
from __future__ import annotations

import dataclasses
import json

import pytest

from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.planning.memory import (
    GIB,
    PlanInput,
    RoleSettings,
    RolloutSettings,
    layer_activation_bytes,
    plan_memory,
    role_memory,
    vllm_memory,
)
from vapo_megatron.planning.params import stage_params, total_params
from vapo_megatron.planning.presets import preset_names, qwen25_arch
from vapo_megatron.planning.report import advice, format_plan

S, B, H, A = 1024, 2, 96, 4


def _gpt_like() -> ModelArch:
    # q = g = h (MHA) and 3f = 8h: a SwiGLU layer that stores exactly what the paper's GELU layer stores.
    return ModelArch(family="qwen2", vocab_size=1000, hidden_size=H, num_layers=8, num_heads=A, num_kv_heads=A,
                     head_dim=H // A, ffn_hidden_size=8 * H // 3, norm_eps=1e-6, rope_theta=1e4,
                     max_position_embeddings=4096, tie_word_embeddings=False, qkv_bias=True)


def _settings(**kw) -> RoleSettings:
    return RoleSettings(**{"micro_batch_tokens": B * S, "seq_len": S, "attention": "unfused", **kw})


def test_activation_formula_is_korthikanti_without_dropout_masks():
    arch = _gpt_like()
    paper_minus_masks = S * B * H * (34 - 2 + 5 * A * S / H)  # 2h bytes of dropout masks: Qwen2.5 has no dropout
    assert layer_activation_bytes(arch, _settings(), 2) == pytest.approx(paper_minus_masks, rel=1e-9)
    t = 4  # tensor parallel without SP: sbh(8 + 24/t + 5as/(ht)), i.e. the paper's 10 + 24/t less the masks
    assert layer_activation_bytes(arch, _settings(tp=t), 2) == pytest.approx(
        S * B * H * (8 + 24 / t + 5 * A * S / (H * t)), rel=1e-9)
    sp = layer_activation_bytes(arch, _settings(tp=t, sequence_parallel=True), 2)
    assert sp == pytest.approx(paper_minus_masks / t, rel=1e-9)  # with SP everything is divided by t
    selective = layer_activation_bytes(arch, _settings(tp=t, sequence_parallel=True, recompute="selective"), 2)
    assert selective == pytest.approx(S * B * H * 32 / t, rel=1e-9)  # the paper's sbh 34/t, less the masks


def test_context_parallel_and_pipeline_and_full_recompute():
    arch = _gpt_like()
    one = layer_activation_bytes(arch, _settings(attention="flash"), 2)
    assert layer_activation_bytes(arch, _settings(attention="flash", cp=2), 2) == pytest.approx(one / 2, rel=1e-6)
    mems = [role_memory(arch, "critic", _settings(pp=pp), 8, 2) for pp in (1, 2, 4)]
    # 1F1B: stage 0 holds pp micro-batches of L/pp layers -> L layers' worth whatever pp is
    assert {m.activations for m in mems} == {arch.num_layers * layer_activation_bytes(arch, _settings(), 2)}
    full = role_memory(arch, "critic", _settings(recompute="full"), 8, 2)
    layer_inputs = arch.num_layers * 2 * B * S * H
    assert full.activations == layer_inputs + layer_activation_bytes(arch, _settings(), 2)


def test_static_memory_and_distributed_optimizer():
    arch = qwen25_arch("7B")
    n = stage_params(arch, "policy", tp=2, pp=1).total
    plain = role_memory(arch, "policy", RoleSettings(tp=2), 8, 2)
    assert (plain.params, plain.grads, plain.optimizer) == (2 * n, 4 * n, 12 * n)  # bf16, fp32 grads, master+m+v
    dist = role_memory(arch, "policy", RoleSettings(tp=2, distributed_optimizer=True), 8, 2)
    assert dist.dp == 4 and dist.optimizer == 12 * n // 4
    assert role_memory(arch, "policy", RoleSettings(tp=2), 8, 4).optimizer == 8 * n  # fp32: no master copy


def test_presets_param_counts_and_vllm_kv():
    assert len(preset_names()) == 7
    expected = {"0.5B": 0.494e9, "1.5B": 1.544e9, "7B": 7.616e9, "32B": 32.764e9, "72B": 72.706e9}
    for name, count in expected.items():
        assert total_params(qwen25_arch(name)) == pytest.approx(count, rel=1e-3), name
    arch = qwen25_arch("32B")
    assert vllm_memory(arch, RolloutSettings(vllm_tp=1), 80 * GIB).kv_bytes_per_token == 2 * 64 * 8 * 128 * 2
    assert vllm_memory(arch, RolloutSettings(vllm_tp=8), 80 * GIB).kv_bytes_per_token == 2 * 64 * 1 * 128 * 2
    with pytest.raises(KeyError, match="known Qwen2.5 sizes"):
        qwen25_arch("33B")


def test_a_plan_that_does_not_fit_names_remedies_that_help():
    arch = qwen25_arch("32B")
    role = RoleSettings(tp=8, sequence_parallel=True, micro_batch_tokens=22528, seq_len=22528)
    plan = plan_memory(PlanInput(arch=arch, policy=role, critic=role, nodes=8,
                                 rollout=RolloutSettings(vllm_tp=8, max_seq_len=22528)))
    assert not plan.fits and any("training" in p for p in plan.problems)
    remedies = advice(plan)
    assert any("distributed optimizer" in r for r in remedies) and any("offload" in r for r in remedies)
    assert "DOES NOT FIT" in format_plan(plan)
    json.dumps(plan.to_dict())  # the --json output is serialisable
    fixed = dataclasses.replace(role, pp=4, distributed_optimizer=True)
    assert plan_memory(dataclasses.replace(plan.inputs, policy=fixed, critic=fixed)).fits


def test_plan_memory_tool(capsys):
    from tools.plan_memory import main

    assert main(["32B", "--nodes", "8", "--policy", "tp=8,pp=4,sp,distopt", "--vllm-tp", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["fits"] and out["policy"]["params_per_rank"] > 1e9
    assert main(["32B", "--nodes", "1", "--policy", "tp=8,sp", "--vllm-tp", "8"]) == 1
    assert main(["32B", "--policy", "tp=8,bogus"]) == 2
    assert "bogus" in capsys.readouterr().err
