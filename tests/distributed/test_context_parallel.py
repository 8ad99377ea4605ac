"""Context parallelism (cp > 1) gives the numbers of the same step without it.

Policy log-probs, critic values, one actor and one critic train step (loss, every metric, gradient norm, every
parameter's gradient) at cp = 2, alone, with TP = 2 + sequence parallelism, and with PP = 2, equal the same
computation in the same processes at cp = 1 (data-parallel over the same ranks, which the engine makes identical to
TP = PP = 1). The CPU path runs megatron-core's local spec with the all-gather CP attention
(models/cp_attention.py), megatron's RoPE slicing per CP rank, the load-balanced split of the schedule, the
autograd gather of per-token outputs and the 1/cp loss scale (parallel/context.py). A failure pinpoints one of
those: a wrong mask or key order (outputs differ), a missing 1/cp or a non-summing backward (gradients off by a
factor), metrics counted once per CP rank (metrics doubled)."""
from __future__ import annotations

import pytest

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB = 128


def _run(hf_dir: str, layouts, batch: dict, agg: str, **kw) -> dict:
    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import (
        actor_objective,
        critic_objective,
        minibatch_counts,
        response_logprobs,
        response_values,
    )
    from vapo_megatron.testing.engines import build_engine

    alg, counts = AlgorithmConfig(loss_agg=agg), minibatch_counts(batch)
    actor, critic = build_engine(hf_dir, "policy", layouts, **kw), build_engine(hf_dir, "critic", layouts, **kw)
    out = {"logprobs": actor.forward(batch, lambda o, mb: response_logprobs(o, mb, VOCAB)[0]),
           "values": critic.forward(batch, lambda o, mb: response_values(o, mb)),
           "actor": actor.train_step(batch, actor_objective(alg, counts, VOCAB)),
           "critic": critic.train_step(batch, critic_objective(alg, counts))}
    out["grads"] = {}
    for name, engine, role in (("actor", actor, "policy"), ("critic", critic, "critic")):
        with layouts.use(role):
            out["grads"][name] = _full_grads(engine, role)
    return out


def _full_grads(engine, role: str) -> dict:
    """Every parameter's gradient as a Megatron full tensor (TP shards merged by the converter's rules, PP stages
    collected by global name), so that layouts with different TP/PP compare; on every rank."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from vapo_megatron.convert.mapping import local_param_maps, merge_tp

    tp, pp = ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size()
    params = {n.removeprefix("module."): p for n, p in engine.model.named_parameters()}
    full = {}
    for local_name, pm in local_param_maps(engine.arch, role, pp, ps.get_pipeline_model_parallel_rank()):
        g = params[local_name].main_grad.detach().clone()
        shards = [g]
        if pm.tp_dim is not None and tp > 1:
            shards = [torch.empty_like(g) for _ in range(tp)]
            dist.all_gather(shards, g, group=ps.get_tensor_model_parallel_group())
        full[pm.name] = merge_tp(pm, shards, engine.arch)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, full)
    return {k: v for d in gathered for k, v in d.items()}


def _body(hf_dir: str, layout: dict, agg: str, kw: dict) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import synthetic_rl_batch

    batch = synthetic_rl_batch(8, VOCAB, seed=7, pad_to_multiple=16)
    ref = _run(hf_dir, RoleLayouts(ParallelConfig(), ParallelConfig()), batch, agg, **kw)
    cp = _run(hf_dir, RoleLayouts(ParallelConfig(**layout), ParallelConfig(**layout)), batch, agg, **kw)
    mask = batch.resp_mask
    diffs = {k: ((ref[k] - cp[k]) * mask).abs().max().item() for k in ("logprobs", "values")}
    for role in ("actor", "critic"):
        diffs.update({f"{role}.{k}": abs(v - cp[role][k]) for k, v in ref[role].items()
                      if k.split("/")[1] not in ("lr", "padding_waste")})  # CP pads to 2 x cp chunks
        names = set(ref["grads"][role])
        assert names == set(cp["grads"][role]), (role, names ^ set(cp["grads"][role]))
        diffs[f"{role}.grads"] = max((ref["grads"][role][n] - cp["grads"][role][n]).abs().max().item() for n in names)
    return {"diffs": diffs, "keys": sorted(ref["actor"]), "grad_norm": ref["actor"]["policy/grad_norm"]}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1))


CASES = {
    "cp2": (2, dict(cp=2), "seq-mean-token-mean", dict(micro_batch_tokens=64)),
    "tp2_cp2_sp": (4, dict(tp=2, cp=2, sequence_parallel=True), "token-mean", {}),
    "pp2_cp2": (4, dict(pp=2, cp=2), "token-mean", {}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_context_parallel_equals_no_context_parallel(hf_dir, case):
    world, layout, agg, kw = CASES[case]
    results = run_distributed(_body, world, hf_dir, layout, agg, kw, timeout=600)
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["diffs"].items() if not v <= 2e-5}
        assert not bad, f"rank {rank}: cp differs from no cp: {bad}"
        assert "policy/pg_loss" in r["keys"] and r["grad_norm"] > 0
