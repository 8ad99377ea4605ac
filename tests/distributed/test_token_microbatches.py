"""Token-budget micro-batches (train.micro_batch_tokens) change the work, not the numbers (padded path:
train.pack_sequences=false).

One actor and one critic train step, and their forwards (old log-probs, values), with rows packed by a token
budget and each micro-batch trimmed to its own longest row, equal the same step with fixed micro-batches of 2 rows
(losses, metrics, gradient norms, every gradient, outputs on response tokens: within 1e-6) while computing fewer
padded tokens. Run at DP=2, where the two ranks pack different numbers of micro-batches (long rows on one, short
on the other), and at PP=2, where micro-batches of different lengths cross the stage boundary. A failure pinpoints
the split (rows lost or reordered, outputs not put back in row order), the trimming (a response position cut off)
or megatron's variable-length p2p."""
from __future__ import annotations

import pytest

from vapo_megatron.models.tiny import save_tiny_hf_model
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed
VOCAB, BUDGET = 128, 48
LENGTHS = [20, 17, 19, 20, 2, 5, 3, 1]  # responses: long rows on DP rank 0, short ones on DP rank 1


def _run(hf_dir: str, layouts, batch: dict, **kw) -> dict:
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
           "values": critic.forward(batch, lambda o, mb: response_values(o, mb)),
           "actor": actor.train_step(batch, actor_objective(alg, counts, VOCAB)),
           "critic": critic.train_step(batch, critic_objective(alg, counts)),
           "grads": [p.main_grad.detach().clone() for e in (actor, critic) for p in e.model.parameters()]}
    with layouts.use("policy"):
        out["n_micro"] = len(actor._micro_batches(batch)[0])
    return out


def _body(hf_dir: str, pp: int) -> dict:
    from vapo_megatron.parallel.layout import ParallelConfig, RoleLayouts
    from vapo_megatron.testing.engines import synthetic_rl_batch

    layouts = RoleLayouts(ParallelConfig(pp=pp), ParallelConfig(pp=pp))
    batch = synthetic_rl_batch(len(LENGTHS), VOCAB, seed=4, lengths=LENGTHS)
    # the padded path (packing off): tests/distributed/test_packing.py compares packed with it
    fixed = _run(hf_dir, layouts, batch, micro_batch_size=2, pack_sequences=False)
    tokens = _run(hf_dir, layouts, batch, micro_batch_tokens=BUDGET, pack_sequences=False)
    mask = batch.resp_mask  # padded response slots read arbitrary positions in either split
    diffs = {k: ((fixed[k] - tokens[k]) * mask).abs().max().item() for k in ("logprobs", "values")}
    for role in ("actor", "critic"):
        diffs.update({f"{role}.{k}": abs(v - tokens[role][k]) for k, v in fixed[role].items()
                      if k.split("/")[1] not in ("lr", "padding_waste")})
    diffs["grads"] = max((a - b).abs().max().item() for a, b in zip(fixed["grads"], tokens["grads"]))
    waste = {m: (r["actor"]["policy/padding_waste"], r["critic"]["critic/padding_waste"]) for m, r in
             (("fixed", fixed), ("tokens", tokens))}
    return {"diffs": diffs, "waste": waste, "n_micro": (fixed["n_micro"], tokens["n_micro"]),
            "keys": sorted(fixed["actor"])}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return str(save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=1))


@pytest.mark.parametrize("pp", [1, 2], ids=["dp2", "pp2"])
def test_token_microbatches_equal_fixed_microbatches(hf_dir, pp):
    results = run_distributed(_body, 2, hf_dir, pp, timeout=300)
    for rank, r in enumerate(results):
        bad = {k: v for k, v in r["diffs"].items() if not v <= 1e-6}
        assert not bad, f"rank {rank}: token micro-batches differ from fixed ones: {bad}"
        assert "policy/pg_loss" in r["keys"] and "policy/clip_frac_high" in r["keys"]
        (fixed_a, fixed_c), (tok_a, tok_c) = r["waste"]["fixed"], r["waste"]["tokens"]
        assert tok_a < fixed_a and tok_c < fixed_c, f"padding waste did not drop: {r['waste']}"
    if pp == 1:  # the DP ranks packed different numbers of micro-batches
        assert results[0]["n_micro"][1] != results[1]["n_micro"][1], [r["n_micro"] for r in results]
