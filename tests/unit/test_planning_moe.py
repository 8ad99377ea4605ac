"""Qwen3 and Qwen3-MoE planning: the presets' parameter counts against Hugging Face's own models built on the meta
device from the same config.json fields (and against the published totals), the expert sharding over ep / etp and
expert-DP, and the MoE terms of the memory plan against hand-derived numbers. A failure names the preset or the
term that drifted."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from vapo_megatron.planning.memory import (
    PlanInput,
    RoleSettings,
    dispatch_bytes,
    layer_activation_bytes,
    plan_memory,
    role_memory,
)
from vapo_megatron.planning.params import active_params, stage_params, total_params
from vapo_megatron.planning.presets import (
    QWEN3_CONFIGS,
    qwen3_arch,
    qwen3_arch_from_config,
    qwen3_preset_names,
    resolve_arch,
)
from vapo_megatron.planning.report import advice

# Published sizes (Qwen3 technical report / model cards), in billions: (total, active).
PUBLISHED = {"Qwen3-8B": (8.2, 8.2), "Qwen3-32B": (32.8, 32.8), "Qwen3-30B-A3B": (30.5, 3.3),
             "Qwen3-235B-A22B": (235.0, 22.0)}
# A MoE shape used nowhere else: dense layers from both decoder_sparse_step and mlp_only_layers, odd sizes.
ODD_MOE = dict(QWEN3_CONFIGS["Qwen3-30B-A3B"], vocab_size=97, hidden_size=24, num_hidden_layers=6,
               num_attention_heads=3, num_key_value_heads=1, head_dim=10, intermediate_size=40,
               moe_intermediate_size=14, num_experts=6, num_experts_per_tok=3, decoder_sparse_step=2,
               mlp_only_layers=[3], tie_word_embeddings=True)


def _hf_counts(cfg: dict) -> tuple[int, int, int]:
    """(all parameters, routed-expert parameters, output-layer parameters) of the Hugging Face model of `cfg`,
    built on the meta device: the slow, obvious reference (no formula of ours involved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {k: v for k, v in cfg.items() if k not in ("model_type", "architectures")}
    config = AutoConfig.for_model(cfg["model_type"], **fields)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    named = dict(model.named_parameters())
    experts = sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    output = 0 if config.tie_word_embeddings else named["lm_head.weight"].numel()
    return sum(p.numel() for p in named.values()), experts, output


@pytest.mark.parametrize("name", list(QWEN3_CONFIGS) + ["odd-moe"])
def test_param_counts_equal_hugging_face_models(name):
    """Failure: the planner counts a tensor HF's model does not have (or misses one: QK-norm, router, experts,
    dense layers of the sparse-step pattern), or a preset's numbers differ from the published model size."""
    cfg = ODD_MOE if name == "odd-moe" else QWEN3_CONFIGS[name]
    arch = qwen3_arch_from_config(cfg)
    hf_total, hf_experts, hf_output = _hf_counts(cfg)
    assert total_params(arch) == hf_total
    assert total_params(arch, "critic") == hf_total - hf_output + arch.hidden_size  # value head, no output layer
    if arch.is_moe:  # a token passes through moe_topk of the num_experts experts of each MoE layer
        assert active_params(arch) == hf_total - hf_experts * (arch.num_experts - arch.moe_topk) // arch.num_experts
    else:
        assert active_params(arch) == hf_total and hf_experts == 0
    if name in PUBLISHED:
        total, active = PUBLISHED[name]
        assert total_params(arch) / 1e9 == pytest.approx(total, rel=0.01)
        assert active_params(arch) / 1e9 == pytest.approx(active, rel=0.02)


def test_odd_moe_layer_pattern_and_preset_lookup():
    """Failure: the dense/MoE layer pattern (decoder_sparse_step, mlp_only_layers) is read wrongly, or a preset
    name is not found the way the CLIs spell it."""
    assert qwen3_arch_from_config(ODD_MOE).moe_layers == (1, 5)  # (i + 1) % 2 == 0, and layer 3 forced dense
    assert qwen3_preset_names(moe=True) == ["Qwen3-30B-A3B", "Qwen3-235B-A22B"]
    assert resolve_arch("qwen3-30b-a3b") == qwen3_arch("Qwen3-30B-A3B")
    with pytest.raises(KeyError, match="known: Qwen3-8B"):
        qwen3_arch("Qwen3-31B")


@pytest.mark.parametrize("tp,pp,ep,etp", [(1, 1, 1, 1), (2, 2, 4, 1), (4, 1, 8, 2), (1, 4, 16, 1)])
def test_experts_are_split_over_ep_and_etp(tp, pp, ep, etp):
    """Failure: a rank holds the wrong share of the experts, or the dense part depends on ep / etp. Summing every
    (pp stage, ep rank, etp rank)'s experts must give all experts exactly once."""
    arch = qwen3_arch("Qwen3-30B-A3B")
    all_experts = len(arch.moe_layers) * arch.num_experts * 3 * arch.moe_ffn_hidden_size * arch.hidden_size
    stages = [stage_params(arch, "policy", tp=tp, pp=pp, pp_rank=r, ep=ep, etp=etp) for r in range(pp)]
    assert sum(s.experts for s in stages) * ep * etp == all_experts
    dense = [stage_params(arch, "policy", tp=tp, pp=pp, pp_rank=r).dense for r in range(pp)]
    assert [s.dense for s in stages] == dense
    with pytest.raises(ValueError, match="ep 3 / etp 1 do not split 128 experts"):
        stage_params(arch, "policy", ep=3)


def test_expert_optimizer_state_is_sharded_over_expert_dp():
    """Failure: expert optimizer state is divided by the dense DP size instead of expert-DP (world / (etp x ep x
    pp)). With the distributed optimizer a stage's expert state is spread over all its ranks, whatever ep is."""
    arch, world, pp = qwen3_arch("Qwen3-30B-A3B"), 64, 2
    stage_experts = len(arch.moe_layers) // pp * arch.num_experts * 3 * arch.moe_ffn_hidden_size * arch.hidden_size
    for ep, etp, tp in [(8, 1, 1), (16, 2, 2), (32, 1, 4)]:
        s = RoleSettings(tp=tp, pp=pp, ep=ep, etp=etp, sequence_parallel=tp > 1, distributed_optimizer=True,
                         micro_batch_tokens=4096, seq_len=4096)
        mem = role_memory(arch, "policy", s, world, 2)
        p = stage_params(arch, "policy", tp=tp, pp=pp, pp_rank=mem.stage, ep=ep, etp=etp)
        dp = world // (tp * pp)
        assert mem.expert_params_per_rank == p.experts == stage_experts // (ep * etp)
        assert mem.optimizer == int(12 * p.dense / dp + 12 * stage_experts / (world // pp))


def test_moe_layer_activations_and_dispatch_buffers():
    """Failure: the MoE layer's activation term or the all-to-all buffers drift from the hand derivation: with
    one expert per token of the dense MLP's width, a MoE layer stores the dense layer's activations plus the fp32
    router logits/probabilities (8E bytes) and the dispatched copies of input and output (2h elements) per token;
    the dispatch buffers are 2 x k x etp copies of the entering tokens' hidden states."""
    moe = qwen3_arch_from_config(dict(ODD_MOE, num_experts_per_tok=1, moe_intermediate_size=40))
    dense_layer, moe_layer = 0, 1
    s = RoleSettings(micro_batch_tokens=1000, seq_len=1000)
    extra = layer_activation_bytes(moe, s, 2, moe_layer) - layer_activation_bytes(moe, s, 2, dense_layer)
    assert extra == 1000 * (8 * moe.num_experts + 2 * 2 * moe.hidden_size)
    sp = RoleSettings(tp=2, sequence_parallel=True, etp=2, micro_batch_tokens=1000, seq_len=1000)
    assert dispatch_bytes(qwen3_arch("Qwen3-30B-A3B"), sp, 2) == 2 * 2 * 8 * 2 * (1000 // 2) * 2048
    assert dispatch_bytes(qwen3_arch("Qwen3-8B"), sp, 2) == 0


def test_moe_plan_reports_expert_layout():
    """Failure: the plan of a MoE model does not carry the dispatch buffers into the training peak or does not
    show the expert layout."""
    from vapo_megatron.planning.report import format_plan

    arch = qwen3_arch("Qwen3-30B-A3B")
    s = RoleSettings(tp=2, sequence_parallel=True, ep=8, distributed_optimizer=True, micro_batch_tokens=22528,
                     seq_len=22528)
    plan = plan_memory(PlanInput(arch=arch, policy=s, critic=s, nodes=2))
    assert plan.policy.dispatch > 0 and plan.policy.training == (plan.policy.activations + plan.policy.logits
                                                                 + plan.policy.dispatch)
    text = format_plan(plan)
    assert "ep8 etp1" in text and "128 experts, top-8" in text
    more_ep = plan_memory(dataclasses.replace(plan.inputs, policy=dataclasses.replace(s, ep=16),
                                              critic=dataclasses.replace(s, ep=16)))
    assert more_ep.policy.params < plan.policy.params and more_ep.phases["training"] < plan.phases["training"]
    assert not plan.fits and any(line.startswith("policy and critic: ep 8 -> 16") for line in advice(plan))


def test_plan_memory_tool_lists_and_plans_moe_presets(capsys):
    """Failure: `tools/plan_memory.py --help` does not list the MoE presets, an expert layout spec is not read,
    or an expert layout the world size cannot hold is not refused with its numbers."""
    from tools.plan_memory import main

    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "mixture-of-experts preset (Qwen3-30B-A3B, Qwen3-235B-A22B)" in help_text
    assert main(["Qwen3-30B-A3B", "--nodes", "8", "--policy", "tp=4,pp=2,ep=16,sp,distopt", "--vllm-tp", "4"]) == 0
    assert "tp4 pp2 cp1 dp8 ep16 etp1 sp distopt" in capsys.readouterr().out
    assert main(["Qwen3-30B-A3B", "--policy", "tp=2,ep=16,sp"]) == 2  # 8 GPUs
    assert "world size 8 is not divisible by etp x ep x pp = 16" in capsys.readouterr().err
