"""Stream a sharded Megatron model out as Hugging Face-named whole tensors (weight sync to vLLM, HF export)."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from vapo_megatron.convert.mapping import full_to_hf
from vapo_megatron.engine.gather import iter_full_tensors
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.parallel.layout import RoleGroups


def iter_hf_tensors(model: torch.nn.Module, arch: ModelArch, role: str = "policy", *,
                    dtype: torch.dtype | None = None, groups: RoleGroups | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, whole tensor) for every parameter, in layer order, on every rank of the model-parallel
    group (collective: all ranks must consume the iterator in lockstep). One Megatron tensor is alive at a
    time; fused QKV / gate-up are split back into HF's separate tensors. `groups` as for `iter_full_tensors`."""
    for pm, full in iter_full_tensors(model, arch, role, dtype=dtype, groups=groups):
        yield from full_to_hf(pm, full, arch).items()


def export_hf(model: torch.nn.Module, arch: ModelArch, out_dir, *, role: str = "policy", hf_assets=None,
              base_config: dict | None = None, dtype: torch.dtype = torch.float32,
              groups: RoleGroups | None = None) -> None:
    """Write the live (sharded) model as a Hugging Face checkpoint: sharded safetensors + index, config.json,
    tokenizer files from `hf_assets`. Collective over all ranks (they stream the whole tensors together);
    rank 0 writes into a temporary directory that appears at `out_dir` only when complete."""
    import json

    import torch.distributed as dist

    from vapo_megatron.convert.atomic import atomic_directory
    from vapo_megatron.convert.hf_io import SafetensorsShardWriter, copy_hf_assets
    from vapo_megatron.convert.megatron_to_hf import hf_config_for, hf_specs

    tensors = iter_hf_tensors(model, arch, role, dtype=dtype, groups=groups)
    if dist.get_rank() != 0:
        for _ in tensors:  # take part in the collectives
            pass
        return
    with atomic_directory(out_dir, overwrite=True) as tmp:
        with SafetensorsShardWriter(tmp, hf_specs(arch, role, dtype)) as writer:
            for name, tensor in tensors:
                writer.write(name, tensor.to(dtype))
        if hf_assets is not None:
            copy_hf_assets(hf_assets, tmp, skip=["config.json"])
        config = hf_config_for(arch, role, dtype, base_config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
