"""megatron-core torch_dist checkpoint (saved at any TP/PP) -> Hugging Face safetensors directory.

The TP=PP=1 model is built on the meta device; its sharded state dict, one layer's entries at a time, is
handed to `dist_checkpointing.load`, which reads just the stored chunks that make up those whole tensors
(resharding from whatever layout they were saved at). The layer is split into HF tensors
(`mapping.full_to_hf`) and appended to the planned safetensors shards. Peak memory: one layer, or the
embedding if larger, plus the stored chunk being read into it (measured by benchmarks/bench_convert.py:
0.17 GiB above the footprint after imports for a 1.1 GB bf16 model, 0.20 GiB for a 2.1 GB one, with a
64 MiB embedding; a 32B model's embedding alone is 1.6 GB, so expect about twice that).

Output: `model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`, config.json, and the tokenizer /
generation-config files kept with the checkpoint (or from `hf_assets`). A policy is written as
`<Family>ForCausalLM`. A critic is written as `<Family>ForTokenClassification` with one label: its `score`
head gives the per-token values; the value head has no bias, so `score.bias` is written as zeros (the
token-classification head of transformers has a bias by default).
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from vapo_megatron.convert.atomic import atomic_directory
from vapo_megatron.convert.hf_io import (
    DEFAULT_MAX_SHARD_BYTES,
    SafetensorsShardWriter,
    TensorSpec,
    copy_hf_assets,
    dtype_name,
    parse_dtype,
)
from vapo_megatron.convert.mapping import ParamMap, full_shape, full_to_hf, param_maps
from vapo_megatron.convert.summary import ConversionSummary
from vapo_megatron.models.hf_config import ModelArch, load_arch

_CLASS_PREFIX = {"qwen2": "Qwen2", "llama": "Llama", "qwen3": "Qwen3", "qwen3_moe": "Qwen3Moe"}


def _class_prefix(arch: ModelArch) -> str:
    if "For" in arch.architecture:
        return arch.architecture.split("For")[0]
    return _CLASS_PREFIX[arch.family]


def _config_from_arch(arch: ModelArch) -> dict:
    """A HF config dict for a checkpoint saved without its HF config (fields read back by `arch_from_hf`)."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config, Qwen3MoeConfig

    cls = {"qwen2": Qwen2Config, "qwen3": Qwen3Config, "qwen3_moe": Qwen3MoeConfig}.get(arch.family, LlamaConfig)
    extra = {} if arch.family == "qwen2" else {"attention_bias": arch.qkv_bias, "head_dim": arch.head_dim}
    if arch.is_moe:
        layers = range(arch.num_layers)
        extra.update(num_experts=arch.num_experts, num_experts_per_tok=arch.moe_topk,
                     moe_intermediate_size=arch.moe_ffn_hidden_size, norm_topk_prob=arch.moe_norm_topk_prob,
                     decoder_sparse_step=1, mlp_only_layers=[i for i in layers if not arch.is_moe_layer(i)],
                     router_aux_loss_coef=arch.moe_aux_loss_coeff)
    cfg = cls(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size, intermediate_size=arch.ffn_hidden_size,
              num_hidden_layers=arch.num_layers, num_attention_heads=arch.num_heads,
              num_key_value_heads=arch.num_kv_heads, max_position_embeddings=arch.max_position_embeddings,
              rms_norm_eps=arch.norm_eps, tie_word_embeddings=arch.tie_word_embeddings,
              initializer_range=arch.init_std, hidden_act="silu", **extra)
    if isinstance(getattr(cfg, "rope_parameters", None), dict):
        cfg.rope_parameters["rope_theta"] = arch.rope_theta
    else:
        cfg.rope_theta = arch.rope_theta
    return cfg.to_dict()


def hf_config_for(arch: ModelArch, role: str, dtype: torch.dtype, base: dict | None) -> dict:
    """config.json of the exported model: the original config with class, dtype and head fields set."""
    cfg = dict(base) if base else _config_from_arch(arch)
    prefix = _class_prefix(arch)
    if role == "policy":
        cfg["architectures"] = [f"{prefix}ForCausalLM"]
        cfg["tie_word_embeddings"] = arch.tie_word_embeddings
    else:
        cfg["architectures"] = [f"{prefix}ForTokenClassification"]
        cfg["id2label"], cfg["label2id"] = {"0": "LABEL_0"}, {"LABEL_0": 0}
    cfg["dtype"] = dtype_name(dtype)
    if "torch_dtype" in cfg:  # configs written by transformers < 5
        cfg["torch_dtype"] = dtype_name(dtype)
    return cfg


def hf_specs(arch: ModelArch, role: str, dtype: torch.dtype) -> list[TensorSpec]:
    """Every HF tensor of the exported model, in the order the converter writes them."""
    specs = []
    for pm in param_maps(arch, role):
        meta = torch.empty(full_shape(pm, arch), device="meta")
        specs += [TensorSpec(n, tuple(t.shape), dtype) for n, t in full_to_hf(pm, meta, arch).items()]
        if role == "critic" and pm.name == "value_head.weight":
            specs.append(TensorSpec("score.bias", (1,), dtype))
    return specs


def layer_groups(maps: list[ParamMap]) -> list[list[ParamMap]]:
    """Parameters loaded together: one transformer layer; the embedding, final norm and head alone.
    (Merging small layers into one read saved ~20% of the time but doubled the peak: not worth it.)"""
    groups: list[list[ParamMap]] = []
    for pm in maps:
        if groups and pm.layer is not None and groups[-1][0].layer == pm.layer:
            groups[-1].append(pm)
        else:
            groups.append([pm])
    return groups


def _checkpoint_info(meg_dir: Path, hf_assets: Path | None, role: str | None):
    from vapo_megatron.convert import dist_ckpt

    info = dist_ckpt.read_info(meg_dir)
    if info is None:
        if hf_assets is None:
            raise FileNotFoundError(f"{meg_dir} has no {dist_ckpt.INFO_FILE}: pass hf_assets (--hf-assets, the HF "
                                    f"model directory the checkpoint was made from) and role (--role)")
        base = json.loads(Path(hf_assets, "config.json").read_text())
        info = dist_ckpt.CheckpointInfo(load_arch(hf_assets), role or "policy", dist_ckpt.stored_dtype(meg_dir), base)
    elif role is not None and role != info.role:
        raise ValueError(f"{meg_dir} holds a {info.role}, not a {role}")
    return info


def convert_megatron_to_hf(meg_dir: str | Path, out_dir: str | Path, *, hf_assets: str | Path | None = None,
                           role: str | None = None, dtype: str | torch.dtype = "auto",
                           max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False,
                           progress: bool = True) -> ConversionSummary:
    """Convert; the output appears at `out_dir` only when complete. Runs in one process and (re)initialises
    megatron's parallel state to TP=PP=1 there."""
    start = time.perf_counter()
    meg_dir = Path(meg_dir)
    if not (meg_dir / "metadata.json").is_file() or not (meg_dir / ".metadata").is_file():
        raise FileNotFoundError(f"{meg_dir} is not a megatron-core torch_dist checkpoint (no metadata.json / "
                                f".metadata)")
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    from vapo_megatron.convert import dist_ckpt  # imports megatron-core

    dist_ckpt.init_single_process()
    info = _checkpoint_info(meg_dir, Path(hf_assets) if hf_assets else None, role)
    stored = dist_ckpt.stored_dtype(meg_dir)
    out_dtype = stored if dtype == "auto" else parse_dtype(dtype)
    assets = Path(hf_assets) if hf_assets else meg_dir / dist_ckpt.ASSETS_DIR
    specs = hf_specs(info.arch, info.role, out_dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        with SafetensorsShardWriter(tmp, specs, max_shard_bytes=max_shard_bytes) as writer:
            _write_tensors(writer, dist_ckpt, info, meg_dir, stored, out_dtype, progress)
        if assets.is_dir():
            copy_hf_assets(assets, tmp, skip=["config.json"])
        config = hf_config_for(info.arch, info.role, out_dtype, info.hf_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return ConversionSummary(Path(out_dir), len(specs), writer.bytes_written, time.perf_counter() - start,
                             largest_tensor=max(s.nbytes for s in specs))


def _write_tensors(writer: SafetensorsShardWriter, dist_ckpt, info, meg_dir: Path, stored: torch.dtype,
                   out_dtype: torch.dtype, progress: bool) -> None:
    from tqdm import tqdm

    meta = dist_ckpt.build_meta_model(info.arch, info.role, stored)
    groups = layer_groups(param_maps(info.arch, info.role))
    loads = dist_ckpt.load_groups(meta, meg_dir, [[pm.name for pm in g] for g in groups])
    for group, loaded in tqdm(zip(groups, loads), total=len(groups), desc="export HF", unit="group",
                              file=sys.stderr, disable=not progress):
        for pm in group:
            for name, tensor in full_to_hf(pm, loaded.pop(pm.name), info.arch).items():
                writer.write(name, tensor.to(out_dtype))
            if info.role == "critic" and pm.name == "value_head.weight":
                writer.write("score.bias", torch.zeros(1, dtype=out_dtype))
