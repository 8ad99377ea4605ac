"""Streaming safetensors reader/writer and the atomic output directory (no megatron involved).
A failure pinpoints the file layer of checkpoint conversion: header layout, shard planning, the errors a
user sees for a damaged download, or output that could look complete after a failed run."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from vapo_megatron.convert.atomic import atomic_directory, partial_dir
from vapo_megatron.convert.hf_io import (
    INDEX_FILE,
    HFCheckpointReader,
    MissingShardError,
    MissingTensorError,
    SafetensorsShardWriter,
    TensorSpec,
    TruncatedShardError,
    copy_hf_assets,
    plan_shards,
)
from vapo_megatron.convert.mapping import ShapeMismatchError


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(16, 8, generator=g),
        "b.weight": torch.randn(40, generator=g).to(torch.bfloat16),
        "c.bias": torch.randn(3, generator=g),
        "d.weight": torch.randn(64, 4, generator=g).to(torch.float16),
    }


def _specs(tensors):
    return [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]


def _write(out, tensors, max_bytes):
    with SafetensorsShardWriter(out, _specs(tensors), max_shard_bytes=max_bytes) as w:
        for name, t in tensors.items():
            w.write(name, t)
    return w


def test_plan_shards_respects_limit_and_order():
    specs = [TensorSpec(f"t{i}", (n,), torch.float32) for i, n in enumerate([10, 10, 30, 5, 5])]
    shards = plan_shards(specs, max_shard_bytes=80)
    assert [[s.name for s in sh] for sh in shards] == [["t0", "t1"], ["t2"], ["t3", "t4"]]


def test_writer_shards_read_back_by_safetensors_and_reader(tmp_path):
    tensors = _tensors()
    w = _write(tmp_path, tensors, max_bytes=520)
    assert len(w.file_names) == 3, w.shards
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert set(index["weight_map"]) == set(tensors)
    merged = {}
    for f in w.file_names:  # the official parser validates our headers and offsets
        merged.update(load_file(tmp_path / f))
    reader = HFCheckpointReader(tmp_path)
    for name, t in tensors.items():
        for got in (merged[name], reader.get(name)):
            assert got.dtype == t.dtype and torch.equal(got, t), name
        assert reader.spec(name) == TensorSpec(name, tuple(t.shape), t.dtype)


def test_writer_rejects_wrong_order_shape_and_missing(tmp_path):
    tensors = _tensors()
    with pytest.raises(ValueError, match="expected 'a.weight', got 'b.weight'"):
        with SafetensorsShardWriter(tmp_path, _specs(tensors)) as w:
            w.write("b.weight", tensors["b.weight"])
    with pytest.raises(ShapeMismatchError, match=r"a.weight: expected shape \(16, 8\), got \(8, 16\)"):
        with SafetensorsShardWriter(tmp_path, _specs(tensors)) as w:
            w.write("a.weight", tensors["a.weight"].t())
    with pytest.raises(ValueError, match="never written"):
        with SafetensorsShardWriter(tmp_path, _specs(tensors)) as w:
            w.write("a.weight", tensors["a.weight"])


def test_reader_errors_name_the_file_or_tensor(tmp_path):
    w = _write(tmp_path, _tensors(), max_bytes=520)
    reader = HFCheckpointReader(tmp_path)
    with pytest.raises(MissingTensorError, match="'nope.weight' is not in the checkpoint"):
        reader.get("nope.weight")
    victim = tmp_path / w.file_names[1]
    data = victim.read_bytes()
    victim.write_bytes(data[:-7])
    with pytest.raises(TruncatedShardError, match=w.file_names[1]):
        HFCheckpointReader(tmp_path)
    victim.unlink()
    with pytest.raises(MissingShardError, match=w.file_names[1]):
        HFCheckpointReader(tmp_path)
    (tmp_path / INDEX_FILE).unlink()
    with pytest.raises(MissingShardError, match="no model.safetensors"):
        HFCheckpointReader(tmp_path)


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_directory(final) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("conversion failed halfway")
    assert not final.exists() and not partial_dir(final).exists()
    with atomic_directory(final) as tmp:
        (tmp / "done").write_text("1")
    assert (final / "done").read_text() == "1" and not partial_dir(final).exists()
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_directory(final):
            pass
    with atomic_directory(final, overwrite=True) as tmp:
        (tmp / "done").write_text("2")
    assert (final / "done").read_text() == "2"


def test_copy_hf_assets_skips_weights(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ["config.json", "tokenizer.json", "generation_config.json", "chat_template.jinja",
                 "model.safetensors", INDEX_FILE, "pytorch_model.bin"]:
        (src / name).write_text("{}")
    copied = copy_hf_assets(src, tmp_path / "dst", skip=["config.json"])
    assert copied == ["chat_template.jinja", "generation_config.json", "tokenizer.json"]
