"""The generation-only entry point end to end on a tiny model: JSONL prompts in, one row per prompt out."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm")

from vapo_megatron.models.tiny import save_tiny_hf_model  # noqa: E402
from vapo_megatron.rollout.generate import generate_main  # noqa: E402


def test_generate_main_writes_n_responses_per_prompt(tmp_path):
    """Both prompt forms are accepted; each output row carries n responses with consistent token counts,
    finish reasons and mean log-probs."""
    model = save_tiny_hf_model(tmp_path / "model", "qwen2", seed=0)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": "2+2="}) + "\n"
                       + json.dumps({"prompt": [{"role": "user", "content": "hi"}]}) + "\n")
    out = tmp_path / "out" / "gen.jsonl"
    argv = ["--model", str(model), "--prompts", str(prompts), "--out", str(out), "--n", "3", "--max-tokens", "8",
            "--seed", "7", "--max-model-len", "128", "--dtype", "float32"]
    assert generate_main(argv) == 0

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt_index"] for r in rows] == [0, 1]
    assert rows[1]["prompt"] == [{"role": "user", "content": "hi"}]
    for row in rows:
        assert len(row["responses"]) == 3
        for resp in row["responses"]:
            assert 1 <= resp["num_tokens"] <= 8 and isinstance(resp["text"], str)
            assert resp["finish_reason"] in ("stop", "length")
            assert resp["finish_reason"] == "stop" or resp["num_tokens"] == 8
            assert resp["mean_logprob"] < 0
