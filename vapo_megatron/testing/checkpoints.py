"""Reading a role's torch_dist checkpoint directory as whole tensors, for tests that compare checkpoints written at
different parallel layouts (megatron-core stores every tensor in global coordinates, so the same model saved at
TP=1 and TP=2 gives the same keys and shapes)."""
from __future__ import annotations

from pathlib import Path

import torch


def global_tensors(role_dir: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint in `role_dir` (`checkpoints/step_*/policy`), whole: model weights and
    optimizer state (`optimizer.state.exp_avg.*`, ...). Byte objects (megatron's common state, `_extra_state`)
    are not read, so nothing in the files is unpickled. Runs in one process without a process group."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(role_dir))
    items = reader.read_metadata().state_dict_metadata.items()
    tensors = {k: torch.empty(v.size, dtype=v.properties.dtype) for k, v in items
               if isinstance(v, TensorStorageMetadata)}
    dcp.load(tensors, storage_reader=reader, no_dist=True)
    return tensors


def max_differences(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor]) -> dict[str, float]:
    """Largest absolute difference of each tensor of `ref` from the same tensor of `other`; KeyError naming the
    keys when the two hold different tensors."""
    if ref.keys() != other.keys():
        raise KeyError(f"different tensors: only in the first {sorted(ref.keys() - other.keys())}, only in the "
                       f"second {sorted(other.keys() - ref.keys())}")
    return {k: (ref[k].double() - other[k].double()).abs().max().item() if ref[k].numel() else 0.0 for k in ref}
