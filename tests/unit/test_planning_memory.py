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
    RolloutBatchFit,
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


# ---- separate placement: a trainer pool (Megatron only) and a rollout pool (vLLM only) ------------------------

def _separate_input(**rollout) -> PlanInput:
    """The tiny GPT-like model on a made-up 1-GiB GPU: 2 trainer GPUs (tp 1, dp 2), 2 rollout GPUs."""
    r = RolloutSettings(**{"vllm_tp": 1, "gpu_memory_utilization": 0.85, "max_seq_len": S,
                           "bucket_bytes": 16 * 2**20, "vllm_reserve_gib": 0.0625, "batch_sequences": 1000,
                           **rollout})
    return PlanInput(arch=_gpt_like(), policy=_settings(), critic=_settings(), rollout=r, nodes=1, gpus_per_node=2,
                     gpu_memory_gib=1.0, overhead_gib=0.125, rollout_gpus=2)


def test_separate_plan_by_hand():
    """Failure: planning/memory.py `_separate_phases` / `rollout_batch_fit` left the module docstring's formulas
    (a vLLM term on the trainer GPUs, a Megatron term on the rollout GPUs, a wrong bucket count or KV size)."""
    plan = plan_memory(_separate_input())
    h, f, q, layers, vocab = H, 8 * H // 3, H, 8, 1000
    layer = h * 3 * q + 3 * q + q * h + h * 2 * f + f * h + 2 * h  # qkv (+ bias), proj, fc1, fc2, two norms
    n_policy = layers * layer + vocab * h + h + vocab * h          # + embedding, final norm, untied output layer
    n_critic = layers * layer + vocab * h + h + h                  # + embedding, final norm, value head
    assert (plan.policy.params_per_rank, plan.critic.params_per_rank) == (n_policy, n_critic)
    static = (2 + 4 + 12) * (n_policy + n_critic)                  # bf16 weights, fp32 grads, master + m + v
    acts = layers * S * B * h * (32 + 5 * A * S / h)               # Korthikanti less the masks, L layers in flight
    logits = 10 * B * S * vocab                                    # bf16 logits + two fp32 shard-sized tensors
    overhead, bucket, gpu = GIB // 8, 16 * 2**20, GIB
    budget = int(0.85 * gpu)
    kv_per_token = 2 * layers * A * (h // A) * 2                   # K and V, every layer, every head, bf16
    tokens = (budget - 2 * n_policy - GIB // 16) // kv_per_token
    expected = {"trainer/training": static + acts + logits + overhead,   # the policy's peak is the larger
                "trainer/weight_sync": static + 2 * bucket + overhead,
                "rollout/generation": budget + overhead,
                "rollout/weight_sync": budget + bucket + overhead}
    assert plan.phases.keys() == expected.keys()
    for name, value in expected.items():
        assert plan.phases[name] == pytest.approx(value, abs=2 * layers), name  # int() per layer term
    assert (plan.vllm.kv_bytes_per_token, plan.vllm.kv_tokens, plan.vllm.max_len_sequences) == (
        kv_per_token, tokens, tokens // S)
    per_engine = 1000 // 2                                          # 1000 sequences over 2 engines of tp 1
    waves = -(-per_engine // (tokens // S))
    assert waves == 2 and plan.rollout_batch == RolloutBatchFit(engines=2, sequences_per_engine=per_engine,
                                                                waves=waves)
    assert plan.fits, plan.problems


def test_separate_trainer_gpus_hold_no_vllm_and_rollout_gpus_only_vllm():
    """Failure: with separate placement the trainer pool's plan still counts vLLM (or a generation phase), or
    the rollout pool's numbers depend on the trainer's layout."""
    arch = qwen25_arch("32B")
    role = RoleSettings(tp=8, pp=4, sequence_parallel=True, distributed_optimizer=True, micro_batch_tokens=22528,
                        seq_len=22528)
    rollout = RolloutSettings(vllm_tp=4, max_seq_len=22528, batch_sequences=8192)
    for sleep in (True, False):
        colocated = plan_memory(PlanInput(arch=arch, policy=role, critic=role, nodes=8,
                                          rollout=dataclasses.replace(rollout, sleep_during_training=sleep)))
        separate = plan_memory(dataclasses.replace(colocated.inputs, rollout_gpus=32))
        assert (separate.policy, separate.critic) == (colocated.policy, colocated.critic)  # same trainer layout
        trainer = {k: v for k, v in separate.phases.items() if k.startswith("trainer/")}
        assert trainer.keys() == {"trainer/training", "trainer/weight_sync"}  # no generation on trainer GPUs
        assert trainer["trainer/weight_sync"] == colocated.phases["weight_sync"] - colocated.vllm.budget
        assert trainer["trainer/training"] == colocated.phases["training"] - (0 if sleep else colocated.vllm.budget)
        assert max(trainer.values()) < max(colocated.phases.values())
    rollout_part = {k: v for k, v in separate.phases.items() if k.startswith("rollout/")}
    other_trainers = [dataclasses.replace(separate.inputs, policy=dataclasses.replace(role, pp=2), critic=None),
                      dataclasses.replace(separate.inputs, nodes=16, gpus_per_node=4)]
    for inp in other_trainers:
        other = plan_memory(inp)
        assert {k: v for k, v in other.phases.items() if k.startswith("rollout/")} == rollout_part
        assert other.vllm == separate.vllm and other.rollout_batch == separate.rollout_batch
    for change in (dict(gpu_memory_utilization=0.6), dict(vllm_tp=8), dict(bucket_bytes=2**30)):
        other = plan_memory(dataclasses.replace(separate.inputs, rollout=dataclasses.replace(rollout, **change)))
        assert (other.phases["rollout/weight_sync"], other.vllm) != (rollout_part["rollout/weight_sync"],
                                                                    separate.vllm), change


def test_separate_remedies_are_per_pool():
    """Failure: report.py advises for separate placement what only colocated placement can use (offloading
    Megatron during generation), or a rollout-pool change for a trainer-pool failure, or nothing that helps."""
    arch = qwen25_arch("32B")
    role = RoleSettings(tp=8, pp=4, sequence_parallel=True, micro_batch_tokens=22528, seq_len=22528)
    starved = plan_memory(PlanInput(arch=arch, policy=dataclasses.replace(role, distributed_optimizer=True),
                                    critic=dataclasses.replace(role, distributed_optimizer=True), nodes=8,
                                    rollout_gpus=8, rollout=RolloutSettings(vllm_tp=1, max_seq_len=22528,
                                                                            gpu_memory_utilization=0.85)))
    assert not starved.fits and all(p.startswith("vLLM") for p in starved.problems)  # 61 GiB of weights at tp 1
    remedies = advice(starved)
    assert any("rollout pool: vLLM gpu_memory_utilization 0.85 -> 0.95" in r for r in remedies)
    assert any("vLLM tp 1 -> 2" in r and "(then fits)" in r for r in remedies)
    assert not any(r.startswith(("policy", "critic")) or "offload" in r for r in remedies)
    two_sequences = dataclasses.replace(role, micro_batch_tokens=2 * 22528)
    heavy = plan_memory(dataclasses.replace(starved.inputs, nodes=4, policy=two_sequences, critic=two_sequences,
                                            rollout=RolloutSettings(vllm_tp=8, max_seq_len=22528)))
    assert [p.split(":")[0] for p in heavy.problems] == ["trainer/training"]
    remedies = advice(heavy)
    assert any("policy and critic: recompute none -> full: trainer/training" in r and "(then fits)" in r
               for r in remedies)
    assert not any(r.startswith("rollout") or "offload" in r for r in remedies)
    text = format_plan(heavy)
    assert "rollout pool 8 GPUs" in text and "trainer/training" in text and "\n  generation" not in text


def test_planned_vllm_utilisations_are_the_engines():
    """Failure: the planner's gpu_memory_utilization for a pool is not what the engine of that pool is built with
    (colocated: RolloutEngineConfig's default; separate: rollout/async_pool.py's)."""
    from vapo_megatron.planning.memory import VLLM_DEFAULT_UTILIZATION, VLLM_SEPARATE_UTILIZATION
    from vapo_megatron.rollout.async_pool import ROLLOUT_POOL_GPU_MEMORY_UTILIZATION
    from vapo_megatron.rollout.vllm_engine import RolloutEngineConfig

    assert VLLM_DEFAULT_UTILIZATION == RolloutEngineConfig().gpu_memory_utilization
    assert VLLM_SEPARATE_UTILIZATION == ROLLOUT_POOL_GPU_MEMORY_UTILIZATION


def test_plan_memory_tool_plans_a_rollout_pool(capsys):
    """Failure: tools/plan_memory.py `--rollout-gpus` does not plan separate placement (at 0.85 by default)."""
    from tools.plan_memory import main

    argv = ["32B", "--nodes", "8", "--policy", "tp=8,pp=4,sp,distopt", "--rollout-gpus", "32", "--vllm-tp", "4"]
    assert main([*argv, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["rollout_gpus"] == 32 and out["rollout_batch"]["engines"] == 8
    assert out["gib"]["rollout/generation"] == 71.0  # 0.85 x 80 + 3 GiB overhead
