"""Streaming the initial weights into one rank's parameters (`load_local_shards`, what `build_model(hf_get=)`
and the trainer use) from a real safetensors file through `HFCheckpointReader`, with no process groups.

* The streamed shards equal slicing the whole Megatron state dict, for every (tp_rank, pp_rank) of TP=2 x PP=2,
  and land in the parameter's dtype.
* Memory: while one parameter is being read, no HF tensor of any other parameter is still alive (weakrefs on
  every tensor the reader returned; a view keeps its base alive, so a kept shard counts too). The old way,
  a whole-model dict built before slicing, trips the same check.
* A rank of pipeline stage 1 of 2 reads only its own layers (and the heads that stage holds), each once.

A failure pinpoints the loader: a wrong piece or stage, or a tensor kept after its parameter was copied.
"""
from __future__ import annotations

import weakref
from collections import Counter

import pytest
import torch
from safetensors.torch import save_file

from vapo_megatron.convert.hf_io import HFCheckpointReader
from vapo_megatron.convert.mapping import (
    hf_shapes,
    iter_hf_to_full,
    load_local_shards,
    param_maps,
    shard_state_dict,
)
from vapo_megatron.models.hf_config import arch_from_hf
from vapo_megatron.models.tiny import tiny_hf_config

ARCHS = {"qwen2": dict(family="qwen2", tie_word_embeddings=False, num_layers=4, vocab_size=127),  # padded at TP=2
         "llama_tied": dict(family="llama", tie_word_embeddings=True, num_layers=4)}
TP, PP = 2, 2


def _arch(name: str):
    return arch_from_hf(tiny_hf_config(**ARCHS[name]))


def _checkpoint(tmp_path, arch, role: str) -> HFCheckpointReader:
    """A safetensors file with random tensors of the right shapes for `role`."""
    g = torch.Generator().manual_seed(0)
    hf = {}
    for pm in param_maps(arch, role):
        for n, shape in hf_shapes(pm, arch).items():
            hf[n] = torch.randn(shape, generator=g)
    save_file(hf, str(tmp_path / "model.safetensors"))
    return HFCheckpointReader(tmp_path)


class TrackingGetter:
    """`reader.get` that records every call and asserts, at each call, that only tensors of the parameter
    being read (the names that share its ParamMap) are still alive."""

    def __init__(self, reader: HFCheckpointReader, arch, role: str):
        self.reader, self.calls, self.alive = reader, Counter(), []
        self.siblings = {n: set(pm.hf_names) for pm in param_maps(arch, role) for n in pm.hf_names}

    def live_names(self) -> set[str]:
        return {name for name, ref in self.alive if ref() is not None}

    def __call__(self, name: str) -> torch.Tensor:
        others = self.live_names() - self.siblings[name]
        assert not others, f"reading {name} while tensors of other parameters are alive: {sorted(others)}"
        self.calls[name] += 1
        t = self.reader.get(name)
        self.alive.append((name, weakref.ref(t)))
        return t


def _full_state(reader, arch, role):
    return {pm.name: t for pm, t in iter_hf_to_full(reader.get, arch, role)}


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("role", ["policy", "critic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_shards_equal_full_dict_slices(tmp_path, name, role, dtype):
    arch = _arch(name)
    reader = _checkpoint(tmp_path, arch, role)
    full = _full_state(reader, arch, role)
    for pp_rank in range(PP):
        for tp_rank in range(TP):
            ranks = dict(tp=TP, tp_rank=tp_rank, pp=PP, pp_rank=pp_rank)
            expected = shard_state_dict(full, arch, role=role, **ranks)
            params = {n: torch.zeros(t.shape, dtype=dtype) for n, t in expected.items()}
            get = TrackingGetter(reader, arch, role)
            load_local_shards(params, get, arch, role, **ranks)
            for n, t in expected.items():
                assert params[n].dtype == dtype and torch.equal(params[n], t.to(dtype)), (ranks, n)
            assert not get.live_names(), f"tensors outlived the load: {sorted(get.live_names())}"


def test_tracking_getter_catches_the_whole_model_dict(tmp_path):
    """The instrument has teeth: building the full state dict first (the pre-streaming trainer) trips it."""
    arch = _arch("qwen2")
    reader = _checkpoint(tmp_path, arch, "policy")
    get = TrackingGetter(reader, arch, "policy")
    with pytest.raises(AssertionError, match="while tensors of other parameters are alive"):
        {pm.name: t for pm, t in iter_hf_to_full(get, arch, "policy")}


@pytest.mark.parametrize("name", ARCHS)
@pytest.mark.parametrize("role", ["policy", "critic"])
def test_last_stage_reads_only_its_own_tensors_once(tmp_path, name, role):
    arch = _arch(name)
    reader = _checkpoint(tmp_path, arch, role)
    params = shard_state_dict(_full_state(reader, arch, role), arch, role=role, tp=TP, tp_rank=1, pp=PP, pp_rank=1)
    params = {n: torch.zeros_like(t) for n, t in params.items()}
    get = TrackingGetter(reader, arch, role)
    load_local_shards(params, get, arch, role, tp=TP, tp_rank=1, pp=PP, pp_rank=1)
    stage0_layers = [n for n in get.calls if n.startswith(("model.layers.0.", "model.layers.1."))]
    assert stage0_layers == [], f"stage 1 read stage 0's layers: {stage0_layers}"
    assert set(get.calls.values()) == {1}, f"tensors read more than once: {get.calls}"
    heads = {"policy": {"qwen2": {"model.norm.weight", "lm_head.weight"},
                        "llama_tied": {"model.norm.weight", "model.embed_tokens.weight"}},  # the tied copy
             "critic": {"qwen2": {"model.norm.weight", "score.weight"},
                        "llama_tied": {"model.norm.weight", "score.weight"}}}[role][name]
    layers = {n for n in reader.names() if n.startswith(("model.layers.2.", "model.layers.3."))}
    assert set(get.calls) == heads | layers


def test_uncovered_parameter_is_named_before_any_read(tmp_path):
    arch = _arch("qwen2")
    reader = _checkpoint(tmp_path, arch, "policy")
    params = shard_state_dict(_full_state(reader, arch, "policy"), arch, role="policy", tp=1, tp_rank=0, pp=1,
                              pp_rank=0)
    params["decoder.layers.9.extra.weight"] = torch.zeros(1)
    get = TrackingGetter(reader, arch, "policy")
    with pytest.raises(KeyError, match=r"missing \['decoder.layers.9.extra.weight'\]"):
        load_local_shards(params, get, arch, "policy", tp=1, tp_rank=0, pp=1, pp_rank=0)
    assert not get.calls
