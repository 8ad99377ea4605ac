"""What to change when a memory plan does not fit (each remedy re-planned, with its effect in numbers), and the
plan as a human table."""
from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from vapo_megatron.planning.memory import GIB, MemoryPlan, PlanInput, RoleSettings, plan_memory


def _layout_changes(inp: PlanInput, s: RoleSettings) -> Iterator[tuple[str, dict]]:
    """Single changes of one role's settings that lower its memory, if its shape and the world size allow them."""
    arch = inp.arch
    if s.recompute != "full":
        yield f"recompute {s.recompute} -> full", dict(recompute="full")
    if not s.distributed_optimizer and inp.world_size // (s.tp * s.pp) > 1:
        yield "enable the distributed optimizer", dict(distributed_optimizer=True)
    tp2 = 2 * s.tp
    if (tp2 <= inp.gpus_per_node and arch.num_heads % tp2 == 0 and arch.num_kv_heads % tp2 == 0
            and inp.world_size % (tp2 * s.pp * s.cp) == 0):
        yield f"tp {s.tp} -> {tp2} (sequence parallel on)", dict(tp=tp2, sequence_parallel=True)
    ep2 = 2 * s.ep
    if arch.is_moe and arch.num_experts % ep2 == 0 and inp.world_size % (s.etp * ep2 * s.pp) == 0:
        yield f"ep {s.ep} -> {ep2}", dict(ep=ep2)
    pp2 = 2 * s.pp
    if (arch.num_layers % pp2 == 0 and inp.world_size % (s.tp * pp2 * s.cp) == 0
            and inp.world_size % (s.etp * s.ep * pp2) == 0):
        yield f"pp {s.pp} -> {pp2}", dict(pp=pp2)
    if s.micro_batch_tokens >= 2 * s.seq_len:
        yield (f"micro-batch tokens {s.micro_batch_tokens} -> {s.micro_batch_tokens // 2}",
               dict(micro_batch_tokens=s.micro_batch_tokens // 2))


def _role_variants(inp: PlanInput) -> Iterator[tuple[str, PlanInput]]:
    """Each change for the policy alone, the critic alone, and both (training peaks at the larger of the two)."""
    roles = [r for r in ("policy", "critic") if getattr(inp, r) is not None]
    for role in roles:
        for label, changes in _layout_changes(inp, getattr(inp, role)):
            yield f"{role}: {label}", dataclasses.replace(
                inp, **{role: dataclasses.replace(getattr(inp, role), **changes)})
    if len(roles) == 2 and inp.policy == inp.critic:
        for label, changes in _layout_changes(inp, inp.policy):
            both = dataclasses.replace(inp.policy, **changes)
            yield f"policy and critic: {label}", dataclasses.replace(inp, policy=both, critic=both)


def _vllm_tp_variant(inp: PlanInput, gpus: int) -> Iterator[tuple[str, PlanInput]]:
    """vLLM tp doubled, if it stays within a node and divides the `gpus` that hold the engines and the heads."""
    r, tp2 = inp.rollout, 2 * inp.rollout.vllm_tp
    if tp2 <= inp.gpus_per_node and gpus % tp2 == 0 and inp.arch.num_heads % tp2 == 0:
        yield f"rollout: vLLM tp {r.vllm_tp} -> {tp2} (more KV cache per engine)", dataclasses.replace(
            inp, rollout=dataclasses.replace(r, vllm_tp=tp2))


def _rollout_pool_variants(inp: PlanInput) -> Iterator[tuple[str, PlanInput]]:
    """Separate placement: vLLM is alone on the rollout GPUs, so its utilisation may take all but the overhead
    and the weight-sync bucket (higher: more KV cache; lower: a pool over its GPUs). Nothing to offload."""
    r, gpu = inp.rollout, inp.gpu_memory_gib * GIB
    util = int(100 * (gpu - inp.overhead_gib * GIB - r.bucket_bytes) / gpu) / 100
    if 0 < util != r.gpu_memory_utilization:
        yield (f"rollout pool: vLLM gpu_memory_utilization {r.gpu_memory_utilization} -> {util} (set in "
               "rollout/async_pool.py, not a config field)"), dataclasses.replace(
            inp, rollout=dataclasses.replace(r, gpu_memory_utilization=util))
    yield from _vllm_tp_variant(inp, inp.rollout_gpus)


def _rollout_variants(inp: PlanInput, plan: MemoryPlan) -> Iterator[tuple[str, PlanInput]]:
    if inp.separate:
        yield from _rollout_pool_variants(inp)
        return
    r = inp.rollout
    if not r.offload_megatron:
        yield "rollout: offload Megatron during generation", dataclasses.replace(
            inp, rollout=dataclasses.replace(r, offload_megatron=True))
    gpu = inp.gpu_memory_gib * GIB
    room = gpu - max(plan.phases["generation"], plan.phases["weight_sync"]) + plan.vllm.budget
    util = int(100 * room / gpu) / 100  # the largest utilisation (2 decimals) that fits next to Megatron
    if 0 < util < r.gpu_memory_utilization:
        yield f"rollout: vLLM gpu_memory_utilization {r.gpu_memory_utilization} -> {util}", dataclasses.replace(
            inp, rollout=dataclasses.replace(r, gpu_memory_utilization=util))
    yield from _vllm_tp_variant(inp, inp.world_size)


def advice(plan: MemoryPlan) -> list[str]:
    """Single changes that lower a failing phase's peak, each with the new peaks; empty when the plan fits."""
    if plan.fits:
        return []
    inp, lines = plan.inputs, []
    failing = [k for k, v in plan.phases.items() if v > inp.gpu_memory_gib * GIB]
    vllm_ok = not any(p.startswith("vLLM") for p in plan.problems)
    for label, variant in [*_role_variants(inp), *_rollout_variants(inp, plan)]:
        new = plan_memory(variant)
        if all(new.phases[k] >= plan.phases[k] for k in failing) and len(new.problems) >= len(plan.problems):
            continue  # changes nothing that is failing
        if vllm_ok and any(p.startswith("vLLM") for p in new.problems):
            continue  # e.g. a utilisation too small for vLLM's own weights
        changes = ", ".join(f"{k} {plan.phases[k] / GIB:.1f} -> {new.phases[k] / GIB:.1f} GiB" for k in failing) or (
            f"KV cache {plan.vllm.kv_tokens:,} -> {new.vllm.kv_tokens:,} tokens per engine")  # only vLLM failed
        lines.append(f"{label}: {changes}{' (then fits)' if new.fits else ''}")
    return lines


def _gib(n: int | float) -> str:
    return f"{n / GIB:8.2f}"


def _cluster_line(inp: PlanInput) -> str:
    gpus = f"{inp.nodes} node(s) x {inp.gpus_per_node} GPUs of {inp.gpu_memory_gib:g} GiB"
    if not inp.separate:
        return f"cluster: {gpus} (world size {inp.world_size})"
    return (f"cluster: trainer pool {gpus} (world size {inp.world_size}, Megatron only); rollout pool "
            f"{inp.rollout_gpus} GPUs of {inp.gpu_memory_gib:g} GiB (vLLM only)")


def _role_lines(plan: MemoryPlan) -> list[str]:
    inp, a = plan.inputs, plan.inputs.arch
    width = 44 if a.is_moe else 32  # the layout column: MoE layouts add "ep.. etp.."
    lines = [f"{'role':8s} {'layout':{width}s} {'params/rank':>12s} {'params':>8s} {'grads':>8s} {'optim':>8s} "
             f"{'activ.':>8s} {'logits':>8s}  (GiB, worst stage)"]
    for mem, s in ((plan.policy, inp.policy), (plan.critic, inp.critic)):
        if mem is None:
            continue
        layout = (f"tp{s.tp} pp{s.pp} cp{s.cp} dp{mem.dp}{f' ep{s.ep} etp{s.etp}' if a.is_moe else ''}"
                  f"{' sp' if s.sequence_parallel else ''}{' distopt' if s.distributed_optimizer else ''}"
                  f" rc={s.recompute}")
        lines.append(f"{mem.role:8s} {layout:{width}s} {mem.params_per_rank / 1e9:11.3f}B {_gib(mem.params)} "
                     f"{_gib(mem.grads)} {_gib(mem.optimizer)} {_gib(mem.activations)} {_gib(mem.logits)}"
                     f"  stage {mem.stage}, {s.micro_batch_tokens} tokens/micro-batch"
                     + (f"; experts {mem.expert_params_per_rank / 1e9:.3f}B/rank, all-to-all buffers "
                        f"{mem.dispatch / GIB:.2f} GiB" if a.is_moe else ""))
    return lines


def _vllm_lines(plan: MemoryPlan) -> list[str]:
    """The engine's budget and KV cache; with separate placement, the rollout batch against the pool's KV cache."""
    inp, v, r = plan.inputs, plan.vllm, plan.inputs.rollout
    lines = [f"vLLM{' (rollout pool)' if inp.separate else ''}: tp {r.vllm_tp}, gpu_memory_utilization "
             f"{r.gpu_memory_utilization} -> budget {v.budget / GIB:.1f} GiB = weights {v.weights / GIB:.1f} + reserve "
             f"{r.vllm_reserve_gib:g} + KV cache {v.kv_cache / GIB:.1f} GiB ({v.kv_bytes_per_token} B/token/GPU: "
             f"{v.kv_tokens:,} tokens per engine, {v.max_len_sequences} sequences of {r.max_seq_len} tokens)"]
    b = plan.rollout_batch
    if b is not None and r.batch_sequences:
        verdict = ("fits the KV cache at once" if b.waves == 1 else
                   f"about {b.waves} waves of {v.max_len_sequences}" if b.waves else "no KV cache")
        lines.append(f"rollout batch: {r.batch_sequences} sequences over {b.engines} engine(s) of tp {r.vllm_tp} = "
                     f"{b.sequences_per_engine} per engine: {verdict} (every sequence counted at {r.max_seq_len} "
                     "tokens; shorter responses fit more)")
    return lines


def _phase_lines(plan: MemoryPlan) -> list[str]:
    inp, gpu = plan.inputs, plan.inputs.gpu_memory_gib * GIB
    where = ("trainer pool Megatron only, rollout pool vLLM only" if inp.separate else
             f"Megatron {'offloaded' if inp.rollout.offload_megatron else 'resident'} during generation")
    width = max(12, *(len(k) + 1 for k in plan.phases))
    return [f"peak per GPU by phase (incl. overhead {inp.overhead_gib:g} GiB; {where}):",
            *(f"  {name:{width}s} {_gib(peak)} GiB  {'ok' if peak <= gpu else 'DOES NOT FIT'} "
              f"({100 * peak / gpu:.0f}%)" for name, peak in plan.phases.items())]


def format_plan(plan: MemoryPlan) -> str:
    """A table per role, vLLM and phases, then the verdict and the remedies."""
    inp, a = plan.inputs, plan.inputs.arch
    lines = [f"model: {a.num_layers} layers, hidden {a.hidden_size}, heads {a.num_heads}/{a.num_kv_heads} kv, ffn "
             f"{a.ffn_hidden_size}, vocab {a.vocab_size} ({'tied' if a.tie_word_embeddings else 'untied'})"
             + (f"; {len(a.moe_layers)} MoE layers of {a.num_experts} experts, top-{a.moe_topk}, expert ffn "
                f"{a.moe_ffn_hidden_size}" if a.is_moe else ""),
             _cluster_line(inp), "", *_role_lines(plan), "", *_vllm_lines(plan), "", *_phase_lines(plan), ""]
    gpu = inp.gpu_memory_gib * GIB
    if plan.fits:
        lines.append(f"fits in {inp.gpu_memory_gib:g} GiB (headroom {(gpu - max(plan.phases.values())) / GIB:.1f} "
                     "GiB in the tightest phase)")
    else:
        lines += ["DOES NOT FIT:", *(f"  - {p}" for p in plan.problems), "what would help (one change each):",
                  *(f"  - {line}" for line in advice(plan) or ["nothing single: use more GPUs"])]
    return "\n".join(lines)
