"""Sequence packing (THD) changes the work, not the numbers.

Policy log-probs and entropies, critic values, and one actor and one critic train step (loss, every metric,
gradient norm, every parameter's gradient) with each micro-batch's rows packed into one stream (token budget,
first-fit decreasing, cu_seqlens) equal the same computation padded (fixed micro-batches of 2 rows, causal mask),
at TP=1 (DP=2: the two ranks pack different rows), TP=2 + sequence parallelism, PP=2 and CP=2, all in one spawned
run of two ranks. The packed CPU path runs megatron-core's GPTModel with `PackedSeqParams`: THD RoPE restarting at
every sequence, the local THD attention (models/thd_attention.py; all-gather of keys/values under CP), the per-slot
CP split (parallel/context.py) and the stream's response positions (engine/objectives.py).

A failure pinpoints: attention crossing sequences or RoPE not restarting (outputs differ), a wrong CP slot split
(outputs differ at cp=2 only), a response position read from the wrong slot (log-probs differ), rows put back in
the wrong order (forwards differ), or a gradient lost in the stream (gradients differ). It also checks that the
packed padding waste is (almost) zero and that both DP ranks run the same number of packed micro-batches."""
from __future__ import annotations

import pytest

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, BUDGET = 128, 64
# responses: long rows on DP rank 0's half, short ones on rank 1's, so first-fit gives the halves different counts
LENGTHS = [30, 17, 25, 20, 2, 5, 3, 1]
LAYOUTS = {"tp1": {}, "tp2_sp": dict(tp=2, sequence_parallel=True), "pp2": dict(pp=2), "cp2": dict(cp=2)}


def _run(hf_dir: str, layouts, batch, **kw) -> dict:
    from vapo_megatron.config import AlgorithmConfig
    from vapo_megatron.engine.objectives import (
        actor_objective,
        critic_objective,
        minibatch_counts,
        response_logprobs,
        response_values,
    )
    from vapo_megatron.testing.engines import build_engine

    alg, counts = AlgorithmConfig(), minibatch_counts(batch)
    actor, critic = build_engine(hf_dir, "policy", layouts, **kw), build_engine(hf_dir, "critic", layouts, **kw)
    out = {"logprobs": actor.forward(batch, lambda o, mb: response_logprobs(o, mb, VOCAB)[0]),
           "entropies": actor.forward(batch, lambda o, mb: response_logprobs(o, mb, VOCAB)[1]),
           "values": critic.forward(batch, lambda o, mb: response_values(o, mb)),
           "actor": actor.train_step(batch, actor_objective(alg, counts, VOCAB)),
           "critic": critic.train_step(batch, critic_objective(alg, counts)),
           "grads": [p.main_grad.detach().clone() for e in (actor, critic) for p in e.model.parameters()]}
    with layouts.use("policy"):
        micro = actor._micro_batches(batch)[0]
    out["n_micro"], out["packed"] = len(micro), all(mb.packed for mb in micro)
    return out


def _body(hf_dir: str) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import synthetic_rl_batch

    batch = synthetic_rl_batch(len(LENGTHS), VOCAB, seed=11, lengths=LENGTHS, prompt_len=(2, 14))
    mask = batch.resp_mask
    report = {}
    for name, layout in LAYOUTS.items():
        layouts = RoleLayouts(ParallelConfig(**layout), ParallelConfig(**layout))
        padded = _run(hf_dir, layouts, batch, pack_sequences=False, micro_batch_size=2)
        packed = _run(hf_dir, layouts, batch, pack_sequences=True, micro_batch_tokens=BUDGET)
        diffs = {k: ((padded[k] - packed[k]) * mask).abs().max().item() for k in ("logprobs", "entropies", "values")}
        for role in ("actor", "critic"):
            assert set(padded[role]) == set(packed[role]), (name, role, set(padded[role]) ^ set(packed[role]))
            diffs.update({f"{role}.{k}": abs(v - packed[role][k]) for k, v in padded[role].items()
                          if k.split("/")[1] not in ("lr", "padding_waste")})
        diffs["grads"] = max((a - b).abs().max().item() for a, b in zip(padded["grads"], packed["grads"]))
        report[name] = {"diffs": diffs, "n_micro": packed["n_micro"], "packed": (padded["packed"], packed["packed"]),
                        "waste": {m: (r["actor"]["policy/padding_waste"], r["critic"]["critic/padding_waste"])
                                  for m, r in (("padded", padded), ("packed", packed))},
                        "grad_norm": padded["actor"]["policy/grad_norm"], "keys": sorted(padded["actor"])}
    return report


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1))


def test_packed_equals_padded_at_tp1_tp2sp_pp2_cp2(hf_dir):
    results = run_distributed(_body, 2, hf_dir, timeout=600)
    for rank, report in enumerate(results):
        for name, r in report.items():
            bad = {k: v for k, v in r["diffs"].items() if not v <= 2e-5}
            assert not bad, f"rank {rank}, {name}: packed differs from padded: {bad}"
            assert r["packed"] == (False, True), (name, r["packed"])
            assert "policy/pg_loss" in r["keys"] and r["grad_norm"] > 0
            (pad_a, pad_c), (pack_a, pack_c) = r["waste"]["padded"], r["waste"]["packed"]
            assert pack_a < pad_a and pack_c < pad_c, (name, r["waste"])
    tp1 = [report["tp1"] for report in results]
    assert tp1[0]["n_micro"] == tp1[1]["n_micro"] > 1, [r["n_micro"] for r in tp1]
    assert tp1[0]["waste"]["packed"][0] < 0.1, tp1[0]["waste"]
