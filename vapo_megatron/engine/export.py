"""Stream a sharded Megatron model out as Hugging Face-named whole tensors (weight sync to vLLM, HF export).

Under TP the HF tensors are written straight from the gathered shards (`shards_to_hf`): one copy per byte does
the TP merge, the un-fusing of QKV / gate-up and the vocabulary trim, where `merge_tp` then `full_to_hf` took
two or three (a `cat`, the QKV regrouping, and the list all-gather's own copy). Profile in docs/weight_sync.md."""
from __future__ import annotations

from collections.abc import Iterator

import torch

from vapo_megatron.convert.mapping import GLU, QKV, ParamMap, full_to_hf
from vapo_megatron.engine.gather import iter_gathered
from vapo_megatron.models.hf_config import ModelArch
from vapo_megatron.parallel.layout import RoleGroups


def iter_hf_tensors(model: torch.nn.Module, arch: ModelArch, role: str = "policy", *,
                    dtype: torch.dtype | None = None, groups: RoleGroups | None = None
                    ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, whole tensor) for every parameter, in layer order, on every rank of the model-parallel
    group (collective: all ranks must consume the iterator in lockstep). One Megatron tensor is alive at a
    time; fused QKV / gate-up are split back into HF's separate tensors. `groups` as for `iter_gathered`.
    At TP = 1 the tensors may be views of the model's own parameters (no copy)."""
    for pm, parts in iter_gathered(model, arch, role, dtype=dtype, groups=groups):
        yield from shards_to_hf(pm, parts, arch).items()


def shards_to_hf(pm: ParamMap, parts: list[torch.Tensor], arch: ModelArch) -> dict[str, torch.Tensor]:
    """The HF tensors of `pm` from its TP shards in rank order (or `[whole Megatron tensor]`), equal to
    `full_to_hf(pm, merge_tp(pm, parts, arch), arch)`, each byte copied once out of the shards."""
    if len(parts) == 1:
        return full_to_hf(pm, parts[0], arch)
    tp, some = len(parts), parts[0]
    tail = tuple(some.shape[1:])

    def empty(*shape: int) -> torch.Tensor:
        return torch.empty(shape, dtype=some.dtype, device=some.device)

    if pm.kind == QKV:
        g, d = arch.num_kv_heads, arch.head_dim
        per_group, local_groups = arch.num_heads // g, g // tp
        q, k, v = empty(arch.num_heads * d, *tail), empty(g * d, *tail), empty(g * d, *tail)
        for r, shard in enumerate(parts):
            pieces = shard.view(local_groups, (per_group + 2) * d, *tail).split([per_group * d, d, d], dim=1)
            for dst, piece in zip((q, k, v), pieces):
                dst.view(tp, local_groups, *piece.shape[1:])[r].copy_(piece)
        return dict(zip(pm.hf_names, (q, k, v)))
    if pm.kind == GLU:
        rows = some.shape[0] // 2
        gate, up = empty(tp * rows, *tail), empty(tp * rows, *tail)
        for r, shard in enumerate(parts):
            gate[r * rows: (r + 1) * rows].copy_(shard[:rows])
            up[r * rows: (r + 1) * rows].copy_(shard[rows:])
        return dict(zip(pm.hf_names, (gate, up)))
    if pm.vocab:
        rows = some.shape[0]
        out = empty(arch.vocab_size, *tail)
        for r, shard in enumerate(parts):
            lo, hi = r * rows, min((r + 1) * rows, arch.vocab_size)
            if hi > lo:
                out[lo:hi].copy_(shard[: hi - lo])
        return {pm.hf_names[0]: out}
    shape = list(some.shape)
    shape[pm.tp_dim] *= tp
    out = empty(*shape)
    for dst, shard in zip(out.chunk(tp, dim=pm.tp_dim), parts):
        dst.copy_(shard)
    return {pm.hf_names[0]: out}


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
