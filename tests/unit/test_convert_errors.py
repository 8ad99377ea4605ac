"""The converters refuse bad input with a message that names the problem, before megatron-core is imported
or anything is written. A failure pinpoints a check that went missing (and a conversion that would then
fail late, or silently produce a wrong model)."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vapo_megatron.convert.hf_io import MissingTensorError, TruncatedShardError
from vapo_megatron.convert.hf_to_megatron import convert_hf_to_megatron, inspect_hf
from vapo_megatron.convert.mapping import ShapeMismatchError
from vapo_megatron.convert.megatron_to_hf import convert_megatron_to_hf
from vapo_megatron.models.hf_config import UnsupportedModelError
from vapo_megatron.models.tiny import save_tiny_hf_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import convert_hf_to_megatron as hf2mg_cli  # noqa: E402


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_hf_model(tmp_path_factory.mktemp("hf") / "qwen2", "qwen2", seed=3, num_layers=2)


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(hf_dir: Path, fn) -> None:
    path = hf_dir / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_unsupported_architecture_lists_supported(tmp_path, qwen_dir, capsys):
    bad = _copy(qwen_dir, tmp_path / "neox")
    cfg = json.loads((bad / "config.json").read_text())
    cfg.update(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=r"GPTNeoXForCausalLM.*Qwen2ForCausalLM"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert hf2mg_cli.main(["--hf-dir", str(bad), "--out-dir", str(tmp_path / "out")]) == 1
    assert "error: unsupported architecture" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_shape_mismatch_names_tensor_and_both_shapes(tmp_path, qwen_dir):
    bad = _copy(qwen_dir, tmp_path / "bad")
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 192
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=r"model.layers.0.mlp.gate_proj.weight: .*needs shape \(192, 128\), "
                                                 r"the checkpoint has \(256, 128\)"):
        inspect_hf(bad)


def test_missing_tensor_is_named(tmp_path, qwen_dir):
    bad = _copy(qwen_dir, tmp_path / "bad")
    _edit_tensors(bad, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(MissingTensorError, match="'lm_head.weight' is not in the checkpoint"):
        inspect_hf(bad, "policy")
    assert inspect_hf(bad, "critic").fresh_value_head  # the critic never needs lm_head


def test_truncated_shard_is_named(tmp_path, qwen_dir):
    bad = _copy(qwen_dir, tmp_path / "bad")
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(TruncatedShardError, match=str(path)):
        convert_hf_to_megatron(bad, tmp_path / "out")


def test_critic_refuses_nonzero_score_bias(tmp_path, qwen_dir):
    bad = _copy(qwen_dir, tmp_path / "rm")

    def add_head(t):
        t["score.weight"] = torch.randn(1, 128)
        t["score.bias"] = torch.ones(1)

    _edit_tensors(bad, add_head)
    with pytest.raises(UnsupportedModelError, match="score.bias is nonzero"):
        inspect_hf(bad, "critic")
    _edit_tensors(bad, lambda t: t["score.bias"].zero_())
    src = inspect_hf(bad, "critic")
    assert not src.fresh_value_head and "lm_head.weight" in src.ignored


def test_existing_output_and_missing_checkpoint(tmp_path, qwen_dir):
    (tmp_path / "out").mkdir()
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_hf_to_megatron(qwen_dir, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="not a megatron-core torch_dist checkpoint"):
        convert_megatron_to_hf(qwen_dir, tmp_path / "hf_out")
