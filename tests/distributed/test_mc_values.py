"""Monte-Carlo values (values/mc.py) with real vLLM engines on gloo ranks, on a toy reward whose value from every
prefix is known exactly: R = 1 iff the response's second token is even.

- From a prefix of two or more response tokens the value is exactly 0 or 1: every continuation scores the same.
- From one token it is P(second token even | prompt, first token), and from the prompt it is the mean of that over
  the first token: both computed exactly from the HF model's softmax (128 tokens, one batched forward).

The batched estimate (one `generate_distributed` call for every prefix) must equal, sample for sample, a slow
reference that asks the engine for each prefix alone (so must the continuations' sample variances, the noise
`ev_ceiling` removes); with K = 48 continuations the estimates must sit within
4.5 standard errors of the exact values. DP=2 (two engines, each its share) runs in the default tier, vLLM TP=2
(one engine over both ranks) in the slow tier. The trainer's probe at TP=2 is in test_trainer_run.py.
"""
from __future__ import annotations

import math

import pytest
import torch

from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed

PROMPTS = [[1, 20, 21, 22], [1, 30], [1, 40, 41, 42, 43, 44], [1, 50, 51]]
K, MAX_LEN, SEED = 48, 8, 7


def _toy_score(rows, responses, cut):
    return torch.tensor([float(len(r) > 1 and r[1] % 2 == 0) for r in responses])


def _slow_values(engine, prompts, responses, boundaries):
    """One engine call per prefix, its global index as the offset (the same seeds as the batched call)."""
    from vapo_megatron.rollout.sampler import SamplingConfig

    min_b = min(b for bounds in boundaries for b in bounds)
    values, variances, index = [], [], 0
    for prompt, response, bounds in zip(prompts, responses, boundaries):
        row, spread = [], []
        for b in bounds:
            params = SamplingConfig(n=K, max_tokens=MAX_LEN - min_b, seed=SEED, logprobs=False)
            out = engine.generate([[*prompt, *response[:b]]], params, prompt_offset=index)
            scores = []
            for cont in out.response_ids:
                full = [*response[:b], *cont[:MAX_LEN - b]]
                scores.append(float(len(full) > 1 and full[1] % 2 == 0))
            mean = sum(scores) / K
            row.append(mean)
            spread.append(sum((x - mean) ** 2 for x in scores) / (K - 1))
            index += 1
        values.append(row)
        variances.append(spread)
    return values, variances


def _mc_body(model_dir: str, tp: int):
    from vapo_megatron.rollout.sampler import SamplingConfig, generate_distributed
    from vapo_megatron.rollout.vllm_engine import RolloutEngine
    from vapo_megatron.values.mc import estimate_values

    engine = RolloutEngine(model_dir, dtype="float32", max_model_len=64, seed=0, tensor_parallel_size=tp)
    try:
        first = generate_distributed(engine, PROMPTS, SamplingConfig(n=1, max_tokens=5, seed=3))
        responses = first.response_ids
        boundaries = [list(range(len(r))) for r in responses]     # every position a step: values from every prefix
        est = estimate_values(engine, PROMPTS, responses, boundaries, _toy_score, k=K, max_response_length=MAX_LEN,
                              seed=SEED)
        slow, slow_var = _slow_values(engine, PROMPTS, responses, boundaries)
    finally:
        engine.shutdown()
    return dict(responses=responses, boundaries=est.boundaries, values=est.values, slow=slow, tokens=est.tokens,
                requests=est.requests, variances=est.variances, slow_var=slow_var, k=est.k)


def _exact_values(model_dir, prompt, response):
    """V(0) and V(1) of the toy reward from the HF model's softmax; V(b >= 2) is 0 or 1."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        p0 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)                     # first token
        vocab = p0.numel()
        seqs = torch.tensor([[*prompt, t] for t in range(vocab)])
        p1 = model(seqs).logits[:, -1].softmax(-1)                                      # second, per first
    even = p1[:, 0::2].sum(-1)
    exact = [float((p0 * even).sum()), float(even[response[0]])]
    return exact + [float(response[1] % 2 == 0)] * (len(response) - 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from vapo_megatron.models.tiny import save_tiny_hf_model

    return str(save_tiny_hf_model(tmp_path_factory.mktemp("mc_model") / "m", "qwen2", seed=0))


def _check(results, model_dir):
    assert results[0] == results[1], "ranks disagree"
    r = results[0]
    assert r["values"] == r["slow"], "batched call differs from one call per prefix"
    assert r["k"] == K and all(math.isclose(a, b, abs_tol=1e-12) for va, vb in zip(r["variances"], r["slow_var"])
                               for a, b in zip(va, vb)), "the continuations' variances (ev_ceiling's noise) differ"
    assert all(v[2:] == [0.0] * (len(v) - 2) for v in r["variances"]), "a decided prefix has no spread"
    assert r["requests"] == K * sum(map(len, r["boundaries"])) and r["tokens"] > 0
    worst = 0.0
    for prompt, response, values in zip(PROMPTS, r["responses"], r["values"]):
        assert len(response) == 5, response  # the random model never ends within 5 tokens here
        exact = _exact_values(model_dir, prompt, response)
        assert values[2:] == exact[2:], "a decided prefix must have an exact 0/1 value"
        for v, e in zip(values[:2], exact[:2]):
            se = math.sqrt(max(e * (1 - e), 1e-12) / K)
            worst = max(worst, abs(v - e) / se)
    assert worst < 4.5, f"an estimate is {worst:.1f} standard errors from the exact value"


def test_mc_values_dp2_two_engines_match_reference_and_exact_values(model_dir):
    pytest.importorskip("vllm")
    _check(run_distributed(_mc_body, 2, model_dir, 1, timeout=540), model_dir)


@pytest.mark.slow
def test_mc_values_vllm_tp2_match_reference_and_exact_values(model_dir):
    pytest.importorskip("vllm")
    _check(run_distributed(_mc_body, 2, model_dir, 2, timeout=540), model_dir)
