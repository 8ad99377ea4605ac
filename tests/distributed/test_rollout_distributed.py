"""Data-parallel rollout over gloo ranks: `generate_distributed` must return, on every rank, exactly what one
engine generates for the whole batch with the same seed.

The fake-engine test checks the split / gather / order bookkeeping in seconds; the vLLM tests run one real
engine per rank under vLLM's external launcher (DP=2, and vLLM TP=2 marked slow).
"""
from __future__ import annotations

import pytest
import torch

from vapo_megatron.rollout.sampler import RolloutOutput, SamplingConfig, generate_distributed, group_requests
from vapo_megatron.testing.dist import run_distributed

pytestmark = pytest.mark.distributed

PROMPTS = [[1, 20, 21, 22], [1, 30], [1, 40, 41, 42, 43, 44], [1, 50, 51], [1, 60, 61, 62, 63]]


class _FakeEngine:
    """Answers each request with (its seed mod 1000, its prompt's length): order, offsets and seeds show."""

    def __init__(self, tensor_parallel_size: int = 1):
        self.tensor_parallel_size = tensor_parallel_size

    def generate(self, prompt_token_ids, params, *, prompt_offset=0):
        requests = group_requests(len(prompt_token_ids), params, prompt_offset)
        if not requests:
            return RolloutOutput.empty()
        return RolloutOutput(
            prompt_index=torch.tensor([prompt_offset + p for p, _, _ in requests]),
            sample_index=torch.tensor([s for _, s, _ in requests]),
            response_ids=[[seed % 1000, len(prompt_token_ids[p])] for p, _, seed in requests],
            rollout_logprobs=[[-1.0, -2.0] for _ in requests], finish_reason=["length"] * len(requests))


FAKE_CASES = [(5, 1), (1, 1), (4, 2)]  # (prompts, TP): uneven split, a rank with no prompt, TP peers


def _fake_body():
    params = SamplingConfig(n=2, seed=5)
    results = []
    for num_prompts, tensor_parallel_size in FAKE_CASES:
        out = generate_distributed(_FakeEngine(tensor_parallel_size), PROMPTS[:num_prompts], params)
        results.append((out.response_ids, out.prompt_index.tolist(), out.sample_index.tolist()))
    return results


def test_generate_distributed_matches_single_engine_fake():
    """Uneven split, a rank with no prompts, and TP peers sharing one slice all give the one-engine result
    (one spawn for all cases: starting ranks costs more than the cases)."""
    params = SamplingConfig(n=2, seed=5)
    expected = []
    for num_prompts, _ in FAKE_CASES:
        ref = _FakeEngine().generate(PROMPTS[:num_prompts], params)
        expected.append((ref.response_ids, ref.prompt_index.tolist(), ref.sample_index.tolist()))
    assert run_distributed(_fake_body, 2, timeout=180) == [expected, expected]


def _vllm_dp_body(old_dir: str, new_dir: str):
    from transformers import AutoModelForCausalLM

    from vapo_megatron.rollout.reference import max_logprob_error
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    engine = RolloutEngine(old_dir, dtype="float32", max_model_len=128, seed=0)
    try:
        params = SamplingConfig(n=2, max_tokens=8, seed=42)
        spread = generate_distributed(engine, PROMPTS, params)
        alone = engine.generate(PROMPTS, params)  # the same engine on the whole batch
        new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
        engine.update_weights(iter(new.state_dict().items()), bucket_bytes=256 * 1024)
        greedy = generate_distributed(engine, PROMPTS, SamplingConfig(temperature=0.0, max_tokens=6))
        error_after_push = max_logprob_error(new, PROMPTS, greedy)
    finally:
        engine.shutdown()
    return dict(spread=(spread.response_ids, spread.prompt_index.tolist(), spread.rollout_logprobs),
                alone=(alone.response_ids, alone.prompt_index.tolist(), alone.rollout_logprobs),
                error_after_push=error_after_push, startup=engine.startup_seconds)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    from vapo_megatron.models.tiny import save_tiny_hf_model

    root = tmp_path_factory.mktemp("rollout_dist_models")
    return (str(save_tiny_hf_model(root / "old", "qwen2", seed=0)),
            str(save_tiny_hf_model(root / "new", "qwen2", seed=1)))


def test_generate_distributed_vllm_dp2_matches_single_engine(model_dirs):
    """Two vLLM engines (external launcher, TP=1 each) splitting 5 prompts x 2 samples return, on both ranks,
    the samples and log-probs one engine gives for the whole batch; a weight push on both ranks then serves
    the new model."""
    pytest.importorskip("vllm")
    results = run_distributed(_vllm_dp_body, 2, *model_dirs, timeout=540)
    print(f"\nvLLM engine start per rank (2 ranks on shared cores): {[round(r['startup'], 1) for r in results]} s")
    for r in results:
        assert r["spread"] == r["alone"]
        assert r["error_after_push"] < 1e-4
    assert results[0]["spread"] == results[1]["spread"]


def _vllm_tp_body(old_dir: str, new_dir: str):
    from transformers import AutoModelForCausalLM

    from vapo_megatron.rollout.reference import max_logprob_error
    from vapo_megatron.rollout.vllm_engine import RolloutEngine

    engine = RolloutEngine(old_dir, dtype="float32", max_model_len=128, seed=0, tensor_parallel_size=2)
    try:
        greedy = SamplingConfig(temperature=0.0, max_tokens=6)
        old = AutoModelForCausalLM.from_pretrained(old_dir, dtype=torch.float32).eval()
        before = max_logprob_error(old, PROMPTS, generate_distributed(engine, PROMPTS, greedy))
        new = AutoModelForCausalLM.from_pretrained(new_dir, dtype=torch.float32).eval()
        engine.update_weights(iter(new.state_dict().items()), bucket_bytes=256 * 1024)
        after = generate_distributed(engine, PROMPTS, greedy)
        return before, max_logprob_error(new, PROMPTS, after), after.response_ids
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_vllm_tp2_logprobs_and_weight_push(model_dirs):
    """One engine with vLLM TP=2 over 2 ranks: log-probs equal HF before and after a push in which every rank
    sends the full tensors (vLLM keeps its shard)."""
    pytest.importorskip("vllm")
    results = run_distributed(_vllm_tp_body, 2, *model_dirs, timeout=540)
    for before, after, _ in results:
        assert before < 1e-4 and after < 1e-4
    assert results[0][2] == results[1][2]
