"""Pure bookkeeping of rollout (no vLLM): seeds, request order, sharding, output containers, weight buckets,
and the generation CLI's file handling. A failure here pinpoints the bookkeeping, not the engine."""
from __future__ import annotations

import json

import pytest
import torch

from vapo_megatron.rollout import generate as gen_cli
from vapo_megatron.rollout.sampler import (
    RolloutOutput,
    SamplingConfig,
    engine_replica,
    group_requests,
    sample_seed,
    shard_bounds,
)
from vapo_megatron.rollout.weight_sync import iter_buckets


def test_sample_seed_is_stable_and_distinct():
    """Seeds are a pure function of (seed, prompt, sample), differ across all three, and fit in 63 bits."""
    assert sample_seed(3, 5, 1) == sample_seed(3, 5, 1)
    seeds = {sample_seed(s, p, i) for s in range(3) for p in range(20) for i in range(8)}
    assert len(seeds) == 3 * 20 * 8
    assert all(0 <= s < 2**63 for s in seeds)


def test_group_requests_are_prompt_major_with_global_seeds():
    """Prompt 0's n samples come first, and an offset slice reuses the full batch's seeds."""
    params = SamplingConfig(n=3, seed=11)
    full = group_requests(4, params)
    assert [(p, s) for p, s, _ in full] == [(p, s) for p in range(4) for s in range(3)]
    tail = group_requests(2, params, prompt_offset=2)
    assert [seed for _, _, seed in tail] == [seed for _, _, seed in full[6:]]


@pytest.mark.parametrize("num_items,num_shards", [(0, 2), (1, 2), (5, 2), (7, 3), (8, 4)])
def test_shard_bounds_cover_in_order(num_items, num_shards):
    """Contiguous shards cover every item exactly once, in order, sizes differing by at most one."""
    bounds = [shard_bounds(num_items, num_shards, r) for r in range(num_shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_items
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_engine_replica_groups_tp_peers():
    assert [engine_replica(r, 4, 2) for r in range(4)] == [(0, 2), (0, 2), (1, 2), (1, 2)]
    with pytest.raises(ValueError, match="group size 3 is not a multiple"):
        engine_replica(0, 3, 2)


def test_sampling_config_validate_quotes_numbers():
    with pytest.raises(ValueError, match=r"n=0 .*top_p=1.5"):
        SamplingConfig(n=0, top_p=1.5).validate()
    SamplingConfig(n=4, temperature=0.0, top_k=1).validate()


def _output(ids, prompt_index, finish=None):
    return RolloutOutput(prompt_index=torch.tensor(prompt_index), sample_index=torch.zeros(len(ids), dtype=torch.long),
                         response_ids=ids, rollout_logprobs=[[-0.5] * len(r) for r in ids],
                         finish_reason=finish or ["length"] * len(ids))


def test_rollout_output_concat_and_padding():
    """concat keeps order; padded() right-pads ids and log-probs and masks exactly the real tokens."""
    out = RolloutOutput.concat([_output([[5, 6, 7]], [0]), RolloutOutput.empty(), _output([[8], [9, 2]], [1, 1])])
    assert out.lengths.tolist() == [3, 1, 2] and out.prompt_index.tolist() == [0, 1, 1]
    ids, logprobs, mask = out.padded(pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [9, 2, 0]]
    assert mask.sum(1).tolist() == [3, 1, 2]
    assert torch.equal(logprobs[mask], torch.full((6,), -0.5)) and not logprobs[~mask].any()


def test_iter_buckets_is_lazy_and_sized():
    """Buckets flush once they reach the byte budget, big tensors go alone, and the input is consumed lazily."""
    consumed = []

    def stream():
        for i, numel in enumerate([10, 10, 10, 100, 5]):
            consumed.append(i)
            yield f"w{i}", torch.zeros(numel)  # float32: 4 bytes per element

    buckets = iter_buckets(stream(), bucket_bytes=80)
    first = next(buckets)
    assert [n for n, _ in first] == ["w0", "w1"] and consumed == [0, 1]
    assert [[n for n, _ in b] for b in buckets] == [["w2", "w3"], ["w4"]]
    with pytest.raises(ValueError, match="bucket_bytes=0"):
        next(iter_buckets(stream(), 0))


def test_read_prompts_and_resolve_model_dir(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n\n" + json.dumps({"prompt": [{"role": "user", "content": "x"}]}))
    assert gen_cli.read_prompts(str(path)) == ["hi", [{"role": "user", "content": "x"}]]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "hi"}))
    with pytest.raises(ValueError, match="no 'prompt' field"):
        gen_cli.read_prompts(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        gen_cli.resolve_model_dir(str(tmp_path))
    (tmp_path / "metadata.json").write_text("{}")  # a bare megatron checkpoint: no arch to rebuild from
    with pytest.raises(ValueError, match="without vapo_checkpoint.json"):
        gen_cli.resolve_model_dir(str(tmp_path))


def test_tokenize_prompt_uses_chat_template():
    """A string prompt becomes one user turn with the assistant turn opened; messages go through as given."""
    from vapo_megatron.models.tiny import build_char_tokenizer

    tok = build_char_tokenizer()
    ids = gen_cli.tokenize_prompt(tok, "1+1")
    assert tok.decode(ids) == "<|im_start|>user\n1+1<|im_end|>\n<|im_start|>assistant\n"
    assert ids == gen_cli.tokenize_prompt(tok, [{"role": "user", "content": "1+1"}])
    assert tok.decode(gen_cli.tokenize_prompt(tok, "1+1", use_chat_template=False)) == "1+1"
