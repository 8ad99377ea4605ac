"""Hugging Face checkpoint -> megatron-core torch_dist checkpoint that training loads at any TP/PP layout.

Nothing of the model is held in memory: the converter builds the TP=PP=1 model on the meta device (so the
keys, global shapes and offsets are exactly what megatron-core writes) and PyTorch DCP asks for each
stored chunk as it writes it; the chunk is made then from the memory-mapped HF tensors (fusing Q/K/V and
gate/up through `mapping.hf_to_full`). Peak memory does not grow with the model: measured by
benchmarks/bench_convert.py (bf16, largest tensor 64 MiB), the peak RSS above the process's footprint after
its imports is 0.24 GiB for a 1.1 GB model and 0.27 GiB for a 2.1 GB one; of that, ~0.1 GiB is anonymous
memory (a fused QKV or gate/up tensor and its chunks) and the rest is pages of the memory-mapped HF files
being read, which the kernel can drop. For a 32B model expect about one embedding (1.6 GB of mapped pages)
plus one fused gate/up weight (0.6 GB) and its half.

Every check that can fail on the input (architecture, missing/truncated shards, missing tensors, shapes)
runs on the safetensors headers before megatron-core is imported or anything is written.

Critic (`role="critic"`): trunk from the checkpoint; value head from `score.weight` when the checkpoint has
one (a reward / sequence-classification model, one label), otherwise freshly drawn from
N(0, initializer_range) with `seed` (the same init as the critic's other projections). `lm_head.weight`
is ignored.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vapo_megatron.convert.atomic import atomic_directory
from vapo_megatron.convert.hf_io import HFCheckpointReader, parse_dtype
from vapo_megatron.convert.mapping import ShapeMismatchError, hf_shapes, hf_to_full, param_maps
from vapo_megatron.convert.summary import ConversionSummary
from vapo_megatron.models.hf_config import ModelArch, UnsupportedModelError, load_arch

VALUE_HEAD = "value_head.weight"


@dataclass
class HFSource:
    """A checked HF checkpoint and the decisions made about it."""

    hf_dir: Path
    arch: ModelArch
    role: str
    reader: HFCheckpointReader
    dtype: torch.dtype
    fresh_value_head: bool = False
    ignored: list[str] = field(default_factory=list)


def inspect_hf(hf_dir: str | Path, role: str = "policy", dtype: str | torch.dtype = "auto") -> HFSource:
    """Read config and headers; raise on anything that would make the conversion fail or be wrong."""
    if role not in ("policy", "critic"):
        raise ValueError(f"role must be 'policy' or 'critic', got {role!r}")
    arch = load_arch(hf_dir)
    reader = HFCheckpointReader(hf_dir)
    used, fresh = set(), False
    for pm in param_maps(arch, role):
        for name, shape in hf_shapes(pm, arch).items():
            if pm.name == VALUE_HEAD and name not in reader:
                fresh = True
                continue
            have = reader.spec(name).shape  # MissingTensorError names the tensor and the files
            if have != shape:
                raise ShapeMismatchError(f"{name}: the config of {hf_dir} needs shape {shape}, "
                                         f"the checkpoint has {have}")
            used.add(name)
    if role == "critic" and "score.bias" in reader:
        if torch.count_nonzero(reader.get("score.bias")).item():
            raise UnsupportedModelError("score.bias is nonzero, but the critic's value head has no bias")
        used.add("score.bias")
    if dtype == "auto":
        dtype = reader.spec("model.embed_tokens.weight").dtype
    return HFSource(Path(hf_dir), arch, role, reader, parse_dtype(dtype), fresh,
                    sorted(set(reader.names()) - used))


def _producer(src: HFSource, seed: int):
    """`produce(megatron name) -> whole Megatron tensor`, reading the HF tensors it is made of."""
    maps = {pm.name: pm for pm in param_maps(src.arch, src.role)}

    def produce(name: str) -> torch.Tensor:
        pm = maps[name]
        if pm.name == VALUE_HEAD and src.fresh_value_head:
            gen = torch.Generator().manual_seed(seed)
            head = torch.empty(1, src.arch.hidden_size).normal_(0.0, src.arch.init_std, generator=gen)
            return head.to(src.dtype)
        return hf_to_full(pm, {n: src.reader.get(n).to(src.dtype) for n in pm.hf_names}, src.arch)

    return produce


def convert_hf_to_megatron(hf_dir: str | Path, out_dir: str | Path, *, role: str = "policy",
                           dtype: str | torch.dtype = "auto", seed: int = 0, overwrite: bool = False,
                           progress: bool = True) -> ConversionSummary:
    """Convert; the output appears at `out_dir` only when complete. Runs in one process and (re)initialises
    megatron's parallel state to TP=PP=1 there."""
    start = time.perf_counter()
    src = inspect_hf(hf_dir, role, dtype)
    if Path(out_dir).exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass overwrite=True / --overwrite to replace it)")
    from vapo_megatron.convert import dist_ckpt  # imports megatron-core: only once the input is known good

    dist_ckpt.init_single_process()
    meta = dist_ckpt.build_meta_model(src.arch, role, src.dtype)
    with atomic_directory(out_dir, overwrite=overwrite) as tmp:
        dist_ckpt.save_lazily(meta, tmp, _producer(src, seed), progress=progress)
        hf_config = json.loads((src.hf_dir / "config.json").read_text())
        dist_ckpt.write_info(tmp, dist_ckpt.CheckpointInfo(src.arch, role, src.dtype, hf_config),
                             hf_assets=src.hf_dir)
    sizes = [p.numel() * p.element_size() for p in meta.parameters()]
    notes = []
    if src.fresh_value_head:
        notes.append(f"no score.weight in {hf_dir}: value head drawn from N(0, {src.arch.init_std}) (seed {seed})")
    if src.ignored:
        notes.append(f"ignored {len(src.ignored)} HF tensor(s) the {role} does not use: {src.ignored[:4]}")
    return ConversionSummary(Path(out_dir), len(sizes), sum(sizes), time.perf_counter() - start,
                             largest_tensor=max(sizes), notes=notes)
