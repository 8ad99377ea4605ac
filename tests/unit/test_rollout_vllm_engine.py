"""The vLLM rollout engine on a tiny Qwen2 (float32, CPU or GPU), checked against Hugging Face forwards.

One engine serves the whole module (starting one costs seconds). Tests that push weights put the original
ones back before they end, so the tests do not depend on their order.
"""
from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("vllm")

from vapo_megatron.models.tiny import save_tiny_hf_model  # noqa: E402
from vapo_megatron.rollout.reference import hf_response_logprobs, max_logprob_error  # noqa: E402
from vapo_megatron.rollout.sampler import SamplingConfig  # noqa: E402
from vapo_megatron.rollout.vllm_engine import RolloutEngine  # noqa: E402

EOS = 2
PROMPTS = [[1, 20, 21, 22, 23], [1, 40, 41], [1, 50, 51, 52, 53, 54, 55, 56], [1, 60]]
TOL = 1e-4


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny Qwen2 checkpoints with different weights: the engine serves `old`, pushes switch to `new`."""
    root = tmp_path_factory.mktemp("rollout_models")
    paths = {"old": save_tiny_hf_model(root / "old", "qwen2", seed=0),
             "new": save_tiny_hf_model(root / "new", "qwen2", seed=1)}
    return {name: _hf_model(path) for name, path in paths.items()} | {"old_dir": paths["old"]}


@pytest.fixture(scope="module")
def engine(models):
    eng = RolloutEngine(models["old_dir"], dtype="float32", max_model_len=256, seed=0)
    print(f"\nvLLM engine start: {eng.startup_seconds:.1f} s")
    yield eng
    eng.shutdown()


def _push(engine, model, bucket_bytes=64 * 1024):
    # small buckets: q/k/v and gate/up of one layer land in different RPCs
    return engine.update_weights(iter(model.state_dict().items()), bucket_bytes=bucket_bytes)


def test_greedy_logprobs_match_hf(engine, models):
    """Greedy tokens are HF's argmax and their log-probs equal HF float32 log-probs (engine forward, KV cache,
    log-prob extraction)."""
    out = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=12))
    for i, response in enumerate(out.response_ids):
        _, argmax = hf_response_logprobs(models["old"], PROMPTS[i], response)
        assert response == argmax.tolist()[:len(response)]
    assert max_logprob_error(models["old"], PROMPTS, out) < TOL


def test_sampled_logprobs_are_raw_not_tempered(engine, models):
    """At temperature 0.7 with top-p the returned log-probs are still the model's temperature-1 log-probs
    (logprobs_mode="raw_logprobs"), the quantity the trainer recomputes."""
    out = engine.generate(PROMPTS[:2], SamplingConfig(n=2, temperature=0.7, top_p=0.9, max_tokens=10, seed=3))
    assert max_logprob_error(models["old"], PROMPTS, out) < TOL


def test_grouped_sampling_is_seeded_ordered_and_consistent(engine):
    """Same seed -> same samples, also when only part of the batch is generated (with its global offset);
    responses come prompt-major; lengths and finish reasons agree with max_tokens and the stop tokens."""
    stops = tuple(range(60, 72))
    params = SamplingConfig(n=3, max_tokens=10, seed=123, stop_token_ids=stops)
    first = engine.generate(PROMPTS, params)
    again = engine.generate(PROMPTS, params)
    assert first.response_ids == again.response_ids
    assert first.prompt_index.tolist() == [p for p in range(len(PROMPTS)) for _ in range(3)]
    assert first.sample_index.tolist() == [0, 1, 2] * len(PROMPTS)
    assert len({tuple(r) for r in first.response_ids[:3]}) == 3, "samples of one prompt should differ"

    tail = engine.generate(PROMPTS[2:], params, prompt_offset=2)
    assert tail.response_ids == first.response_ids[6:]
    assert tail.prompt_index.tolist() == first.prompt_index.tolist()[6:]
    other_seed = engine.generate(PROMPTS, SamplingConfig(n=3, max_tokens=10, seed=124, stop_token_ids=stops))
    assert other_seed.response_ids != first.response_ids

    assert set(first.finish_reason) == {"stop", "length"}, "pick stops so that both endings occur"
    for ids, lps, length, reason in zip(first.response_ids, first.rollout_logprobs, first.lengths.tolist(),
                                        first.finish_reason):
        assert len(ids) == len(lps) == length
        ended_on_stop = ids[-1] in stops or ids[-1] == EOS
        assert not any(t in stops or t == EOS for t in ids[:-1])
        assert reason == ("stop" if ended_on_stop else "length")
        assert length <= 10 and (reason == "stop" or length == 10)


def test_update_weights_switches_the_served_model(engine, models):
    """After a bucketed push of other weights, vLLM's log-probs match the new HF model and no longer the old
    one (the push reaches every layer and the prefix cache of the old weights is dropped); pushing the old
    weights back restores them."""
    greedy = SamplingConfig(temperature=0.0, max_tokens=12)
    before = engine.generate(PROMPTS, greedy)
    try:
        stats = _push(engine, models["new"])
        assert stats.buckets > 10 and stats.tensors == len(models["new"].state_dict())
        assert stats.bytes == sum(t.numel() * 4 for t in models["new"].state_dict().values())
        print(f"\nweight push: {stats}")
        after = engine.generate(PROMPTS, greedy)
        assert max_logprob_error(models["new"], PROMPTS, after) < TOL
        assert max_logprob_error(models["old"], PROMPTS, after) > 0.1
        assert after.response_ids != before.response_ids
    finally:
        _push(engine, models["old"])
    restored = engine.generate(PROMPTS, greedy)
    assert restored.response_ids == before.response_ids
    assert max_logprob_error(models["old"], PROMPTS, restored) < TOL


def test_partial_push_raises_and_leaves_other_layers(engine, models):
    """A strict push that sets only some parameters names the missing ones; layers that got nothing keep
    their weights (vLLM restores their kernel tensors)."""
    norm_only = [(n, t) for n, t in models["old"].state_dict().items() if n == "model.norm.weight"]
    held = engine.weight_version
    with pytest.raises(ValueError, match="left .* vLLM parameters unset"):
        engine.update_weights(iter(norm_only), version=held + 100)
    assert engine.weight_version == held, "a partial push must not claim the new policy version"
    out = engine.generate(PROMPTS[:2], SamplingConfig(temperature=0.0, max_tokens=6))
    assert max_logprob_error(models["old"], PROMPTS, out) < TOL


def test_push_records_the_policy_version(engine, models):
    """A complete push records the version the caller passes (stats and `weight_version`); without one the
    version held goes up by one. A stream that fails mid-push leaves the version held."""
    stats = engine.update_weights(iter(models["old"].state_dict().items()), version=41)
    assert stats.version == engine.weight_version == 41
    assert engine.update_weights(iter(models["old"].state_dict().items())).version == 42 == engine.weight_version

    def failing():
        yield from list(models["new"].state_dict().items())[:4]
        raise RuntimeError("trainer died mid-push")
    with pytest.raises(RuntimeError, match="mid-push"):
        engine.update_weights(failing(), version=43)
    assert engine.weight_version == 42
    _push(engine, models["old"])  # the failed push left the first layers' new weights in
    out = engine.generate(PROMPTS[:2], SamplingConfig(temperature=0.0, max_tokens=6))
    assert max_logprob_error(models["old"], PROMPTS, out) < TOL


def test_sleep_and_wake_up(engine, caplog):
    """On CPU sleep()/wake_up() are no-ops that say so once (no error); on GPU the engine still generates after
    a sleep / wake-up cycle."""
    caplog.set_level(logging.INFO, logger="vapo_megatron.rollout.vllm_engine")
    for _ in range(2):
        engine.sleep()
        engine.wake_up()
    if not engine.llm.llm_engine.vllm_config.model_config.enable_sleep_mode:
        assert sum("sleep mode is off" in r.getMessage() for r in caplog.records) == 1
    out = engine.generate(PROMPTS[:1], SamplingConfig(temperature=0.0, max_tokens=4))
    assert out.lengths.tolist() == [4] or out.finish_reason == ["stop"]


def _served_tensors(worker) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the worker's vLLM model, cloned (runs in the engine's worker); buffer
    names end in "(buffer)"."""
    model = worker.model_runner.get_model()
    return {**{name: t.detach().clone() for name, t in model.named_parameters()},
            **{f"{name}(buffer)": t.detach().clone() for name, t in model.named_buffers()}}


def test_weight_sync_says_nothing_about_rotary_and_loads_every_weight(engine, models):
    """Issue 23 item 9: every weight sync printed `RotaryEmbedding: Failed to load weights` (vLLM counts the
    rotary layer's `cos_sin_cache`, a non-persistent buffer computed from the config, as a weight to load; no
    checkpoint has it). After a push: no such warning; the rotary cache is the one computed at start; the
    weights that vLLM keeps in HF layout equal the pushed ones; every other tensor changed, and the log-probs are
    the new model's (every weight arrived). A failure pinpoints colocated.begin_weight_update."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    reload_log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    reload_log.addHandler(handler)
    before = engine._rpc(_served_tensors)
    try:
        _push(engine, models["new"])
        after = engine._rpc(_served_tensors)
        out = engine.generate(PROMPTS, SamplingConfig(temperature=0.0, max_tokens=12))
    finally:
        reload_log.removeHandler(handler)
        _push(engine, models["old"])
    assert not [r.getMessage() for r in records if "Failed to load" in r.getMessage()]
    assert max_logprob_error(models["new"], PROMPTS, out) < TOL
    new = models["new"].state_dict()
    rotary = [n for n in after if n.endswith("cos_sin_cache(buffer)")]
    assert rotary and all(torch.equal(after[n], before[n]) for n in rotary)
    same_layout = [n for n in after if n in new and after[n].shape == new[n].shape]
    assert "model.embed_tokens.weight" in same_layout and "model.norm.weight" in same_layout
    for n in same_layout:
        assert torch.equal(after[n], new[n]), n
    # q/k/v, gate/up: fused; at least not the old values (on CPU vLLM repacks linear weights into oneDNN's own
    # storage and leaves the parameters empty: the log-probs above are then what shows they arrived)
    fused = [n for n in after if not n.endswith("(buffer)") and n not in same_layout and after[n].numel()]
    for n in fused:
        assert not torch.equal(after[n], before[n]), n
