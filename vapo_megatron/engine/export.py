"""Stream a sharded Megatron model out as Hugging Face-named whole tensors (weight sync to vLLM, HF export)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from vapo_megatron.convert.mapping import full_to_hf
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.parallel.gather import iter_full_tensors


def iter_hf_tensors(model: torch.nn.Module, arch: ModelArch, role: str = "policy", *,
                    dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, whole tensor) for every parameter, in layer order, on every rank of the model-parallel
    group (collective: all ranks must consume the iterator in lockstep). One Megatron tensor is alive at a
    time; fused QKV / gate-up are split back into HF's separate tensors."""
    for pm, full in iter_full_tensors(model, arch, role, dtype=dtype):
        yield from full_to_hf(pm, full, arch).items()
