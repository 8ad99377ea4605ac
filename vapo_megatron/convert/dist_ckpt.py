"""megatron-core distributed checkpoints (torch_dist) of the policy or critic, plus what tools need to rebuild
the model from one.

Layout of a checkpoint directory:
    metadata.json, .metadata, __*_*.distcp   megatron-core torch_dist (PyTorch DCP underneath)
    vapo_checkpoint.json                     role, dtype, ModelArch and the HF config (see CheckpointInfo)
    hf_assets/                               config.json, tokenizer files, generation_config.json (optional)

torch_dist stores every tensor in *global* coordinates (layers stacked on a leading axis, TP shards at their
offsets), so a checkpoint written at any TP/PP loads at any other. Three ways in and out:
  * `save_model` / `load_model`: collective, from/to a live model at any layout (training, resume);
  * `save_lazily`: single process, from a model built on the meta device at TP=PP=1 (so every key, shape
    and offset is exactly what megatron-core itself would write) with tensor data produced on demand, one
    chunk at a time, while PyTorch DCP writes; the HF -> Megatron converter never holds the model;
  * `load_groups`: single process, loads a few parameters at a time (e.g. one layer) at TP=PP=1, whatever
    the layout the checkpoint was saved at; the Megatron -> HF converter never holds the model.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingConfig, save_config
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
)
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess, save_preprocess
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch

from vapo_megatron.convert import atomic
from vapo_megatron.convert.hf_io import copy_hf_assets, dtype_name, parse_dtype
from vapo_megatron.convert.mapping import ShapeMismatchError
from vapo_megatron.convert.safe_load import restricted_dcp_load
from vapo_megatron.models.hf_config import ModelArch, transformer_config

INFO_FILE = "vapo_checkpoint.json"
ASSETS_DIR = "hf_assets"


@dataclass(frozen=True)
class CheckpointInfo:
    """What a tool needs to rebuild the model of a checkpoint (stored as vapo_checkpoint.json)."""

    arch: ModelArch
    role: str  # "policy" or "critic"
    dtype: torch.dtype
    hf_config: dict[str, Any] | None = None  # the HF config.json the model came from, verbatim

    def to_json(self) -> str:
        return json.dumps({"format": "vapo-megatron", "version": 1, "role": self.role,
                           "dtype": dtype_name(self.dtype), "arch": self.arch.to_dict(),
                           "hf_config": self.hf_config}, indent=2) + "\n"

    @staticmethod
    def from_json(text: str) -> CheckpointInfo:
        raw = json.loads(text)
        return CheckpointInfo(arch=ModelArch(**raw["arch"]), role=raw["role"], dtype=parse_dtype(raw["dtype"]),
                              hf_config=raw.get("hf_config"))


def write_info(ckpt_dir: str | Path, info: CheckpointInfo, hf_assets: str | Path | None = None) -> None:
    """Write vapo_checkpoint.json and copy the HF non-weight files (tokenizer, configs) beside the tensors."""
    Path(ckpt_dir, INFO_FILE).write_text(info.to_json())
    if hf_assets is not None:
        copy_hf_assets(hf_assets, Path(ckpt_dir, ASSETS_DIR))


def read_info(ckpt_dir: str | Path) -> CheckpointInfo | None:
    path = Path(ckpt_dir, INFO_FILE)
    return CheckpointInfo.from_json(path.read_text()) if path.is_file() else None


def is_checkpoint(ckpt_dir: str | Path) -> bool:
    return Path(ckpt_dir, "metadata.json").is_file() and Path(ckpt_dir, ".metadata").is_file()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare megatron module under DDP / Float16 wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


# ---- collective save / load of a live model ---------------------------------------------------------------

def save_model(model: torch.nn.Module, ckpt_dir: str | Path, *, arch: ModelArch, role: str,
               hf_assets: str | Path | None = None, overwrite: bool = False) -> Path:
    """Save the model (any TP/PP layout; call on every rank) as a torch_dist checkpoint at `ckpt_dir`,
    written into a partial directory that rank 0 renames into place once every rank has finished."""
    module = unwrap(model)
    final = Path(ckpt_dir)
    ok = [True, ""]
    if dist.get_rank() == 0:
        try:
            atomic.prepare(final, overwrite=overwrite)
        except OSError as exc:
            ok = [False, str(exc)]
    dist.broadcast_object_list(ok, src=0)  # also the barrier: the partial directory exists from here on
    if not ok[0]:
        raise FileExistsError(ok[1])
    tmp = atomic.partial_dir(final)
    dist_checkpointing.save(module.sharded_state_dict(), str(tmp))
    if dist.get_rank() == 0:
        hf_config = _hf_config(hf_assets)
        dtype = next(module.parameters()).dtype
        write_info(tmp, CheckpointInfo(arch, role, dtype, hf_config), hf_assets)
        atomic.commit(tmp, final)
    dist.barrier()
    return final


def _hf_config(hf_assets: str | Path | None) -> dict | None:
    path = Path(hf_assets, "config.json") if hf_assets is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


def load_model(model: torch.nn.Module, ckpt_dir: str | Path, *, strict: bool = True) -> None:
    """Load a torch_dist checkpoint saved at any layout into the model of this rank (call on every rank)."""
    if not is_checkpoint(ckpt_dir):
        raise FileNotFoundError(f"{ckpt_dir} is not a megatron-core torch_dist checkpoint "
                                f"(no metadata.json / .metadata)")
    module = unwrap(model)
    info = read_info(ckpt_dir)
    role = "critic" if hasattr(module, "is_value_stage") else "policy"
    if info is not None and info.role != role:
        raise ValueError(f"{ckpt_dir} holds a {info.role}, the model is a {role}")
    sharded = module.sharded_state_dict()
    check_global_shapes(sharded, ckpt_dir)
    with restricted_dcp_load():  # nothing in the checkpoint runs code (convert/safe_load.py)
        state = dist_checkpointing.load(sharded, str(ckpt_dir))
    module.load_state_dict(state, strict=strict)


def check_global_shapes(sharded: dict, ckpt_dir: str | Path) -> None:
    """Raise ShapeMismatchError naming the tensor and both global shapes before megatron starts reading.
    Vocabulary tensors may differ in their padded row count (megatron reads the overlap)."""
    with restricted_dcp_load():
        stored = dist_checkpointing.load_tensors_metadata(str(ckpt_dir))
    applied, _, _ = load_preprocess(sharded)
    for sh in nested_values(applied):
        if not isinstance(sh, ShardedTensor) or sh.key not in stored:
            continue  # a missing key is reported by megatron with the list of stored keys
        have, want = tuple(stored[sh.key].global_shape), tuple(sh.global_shape)
        same = have[1:] == want[1:] if sh.allow_shape_mismatch else have == want
        if not same:
            raise ShapeMismatchError(f"{sh.key}: checkpoint {ckpt_dir} has global shape {have}, "
                                     f"the model expects {want}")


def stored_dtype(ckpt_dir: str | Path) -> torch.dtype:
    """The dtype the word embeddings were saved in."""
    with restricted_dcp_load():
        return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))["embedding.word_embeddings.weight"].dtype


# ---- single-process streaming, on a meta-device model at TP=PP=1 ------------------------------------------

def init_single_process() -> None:
    """A one-rank gloo group and TP=PP=1 megatron state: what the converters run in. (Not
    `parallel.layout.initialize`: its CPU device-redirect mode would intercept every torch call, and a
    converter only needs the meta device and CPU tensors.)"""
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    if dist.get_world_size() != 1:
        raise RuntimeError(f"checkpoint conversion runs in a single process, not {dist.get_world_size()} ranks")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(1, 1, create_gloo_process_groups=True)
    tensor_parallel.model_parallel_cuda_manual_seed(0)


def build_meta_model(arch: ModelArch, role: str, dtype: torch.dtype) -> torch.nn.Module:
    """The TP=PP=1 model on the meta device (shapes, no data); needs `init_single_process()` first."""
    from vapo_megatron.models.critic import build_critic
    from vapo_megatron.models.policy import build_policy
    from vapo_megatron.parallel.layout import ParallelConfig

    config = transformer_config(arch, ParallelConfig(), params_dtype=dtype, use_cpu_initialization=True,
                                perform_initialization=False)
    with torch.device("meta"):
        return build_policy(arch, config) if role == "policy" else build_critic(arch, config)


class _LazySavePlanner(mcore_torch.MCoreSavePlanner):
    """megatron-core's planner, except that a tensor's data is produced only when DCP writes it.

    At TP=PP=1 a stored chunk at global offset (layer, o1, o2, ...) of key K is the slice at (o1, o2, ...)
    of the whole parameter that owns it, so `produce(parameter name)` and a slice give the bytes. One
    whole parameter is cached: the two halves of the fused gate/up weight are consecutive chunks."""

    def __init__(self, owners: dict, produce: Callable[[str], torch.Tensor], bar, **kwargs):
        super().__init__(**kwargs)
        self._owners, self._produce, self._bar = owners, produce, bar
        self._name, self._full = None, None

    def resolve_data(self, write_item):
        obj = super().resolve_data(write_item)
        if not isinstance(obj, torch.Tensor):
            return obj  # serialized ShardedObjects (extra state, common state)
        index, chunk = write_item.index, write_item.tensor_data.chunk
        name = self._owners[(index.fqn, tuple(index.offset))]
        if name != self._name:
            self._name, self._full = None, None  # free the previous parameter first
            self._full, self._name = self._produce(name).contiguous(), name
        global_size = tuple(write_item.tensor_data.size)
        lead = len(global_size) - self._full.ndim  # stacked-layer axes
        if tuple(self._full.shape) != global_size[lead:]:
            raise ShapeMismatchError(f"{name}: expected shape {global_size[lead:]}, got {tuple(self._full.shape)}")
        region = tuple(slice(o, o + s) for o, s in zip(chunk.offsets[lead:], chunk.sizes[lead:]))
        # The model's own dtype for this parameter, as megatron would save it: e.g. the local spec keeps
        # norm weights in float32 in a bf16 model (a lossless widening; export narrows them back exactly).
        data = self._full[region].reshape(tuple(chunk.sizes)).to(obj.dtype)
        self._bar.update(data.nbytes)
        return data


def save_lazily(meta_model: torch.nn.Module, ckpt_dir: str | Path, produce: Callable[[str], torch.Tensor], *,
                progress: bool = True) -> None:
    """Write the torch_dist checkpoint of `meta_model` (TP=PP=1, meta device) into the existing empty
    `ckpt_dir`, calling `produce(name)` for the whole tensor of each parameter (named as in the model's
    state dict, i.e. the Megatron full name) when it is written. Same files as `dist_checkpointing.save`."""
    from torch.distributed import checkpoint as dcp
    from tqdm import tqdm

    sharded, common = save_preprocess(meta_model.sharded_state_dict(), validate_access_integrity=True)
    owners = {(sh.key, tuple(sh.global_offset)): name for name, value in sharded.items()
              for sh in _leaves(value) if isinstance(sh, ShardedTensor)}
    total = sum(sh.data.nbytes for sh in nested_values(sharded) if isinstance(sh, ShardedTensor))
    sharded["common_state"] = ShardedObject("common_state", common, (1,), (0,), replica_id=0)
    by_key, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(sharded, keep_only_main_replica=True)
    pyt_state = mcore_torch.mcore_to_pyt_state_dict(by_key, is_loading=False)
    with tqdm(total=total, unit="B", unit_scale=True, desc="write torch_dist", file=sys.stderr,
              disable=not progress) as bar:
        planner = _LazySavePlanner(owners, produce, bar, flatten_state_dict=False, flatten_sharded_tensors=False)
        writer = dcp.FileSystemWriter(str(ckpt_dir), thread_count=1, sync_files=False, per_thread_copy_ahead=0)
        dcp.save(pyt_state, storage_writer=writer, planner=planner, no_dist=True)
    save_config(CheckpointingConfig("torch_dist", 1), str(ckpt_dir))


def _leaves(value) -> Iterator:
    """The ShardedBase leaves of one state-dict entry (a factory may have turned it into a list)."""
    return nested_values(value) if isinstance(value, (dict, list)) else iter([value])


def _explicit_axes(sh: ShardedTensor) -> ShardedTensor:
    """A copy with empty CPU data whose stacked-layer axes are ordinary axes of size 1.

    Why: megatron hands tensors with prepended (layer) axes to DCP as torch ShardedTensors that must list
    every chunk of the key held by the loading rank, so in a one-rank process one layer cannot be loaded
    without all the others. The explicit form goes through megatron's checkpointable path, which asks DCP
    for exactly the chunks given."""
    shape = (1,) * sh.prepend_axis_num + tuple(sh.local_shape)
    return dataclasses.replace(sh, data=torch.empty(shape, dtype=sh.dtype), local_shape=shape, prepend_axis_num=0)


def _loadable(item) -> tuple[Any, Callable]:
    """(what to give dist_checkpointing.load for one parameter, how to turn its result into the tensor)."""
    if isinstance(item, ShardedTensor):
        shape = tuple(item.local_shape)
        return _explicit_axes(item), lambda t: t.view(shape)
    if isinstance(item, ShardedTensorFactory):
        parts = item.build()  # e.g. the gate and up halves of the fused fc1 weight
        if isinstance(parts, list) and all(isinstance(p, ShardedTensor) for p in parts):
            shapes = [tuple(p.local_shape) for p in parts]
            return ([_explicit_axes(p) for p in parts],
                    lambda ts: item.merge_fn([t.view(s) for t, s in zip(ts, shapes)]))
    raise NotImplementedError(f"cannot load {type(item).__name__} {getattr(item, 'key', '')} one group at a time")


def load_groups(meta_model: torch.nn.Module, ckpt_dir: str | Path, groups: Iterable[Sequence[str]]
                ) -> Iterator[dict[str, torch.Tensor]]:
    """For each group of parameter names (TP=PP=1 state-dict names), load just those whole tensors from a
    checkpoint saved at any layout. Memory: one group at a time."""
    sharded = meta_model.sharded_state_dict()
    for names in groups:
        plans = {n: _loadable(sharded[n]) for n in names}
        with restricted_dcp_load():
            loaded = dist_checkpointing.load({n: p[0] for n, p in plans.items()}, str(ckpt_dir),
                                             validate_access_integrity=False)
        yield {n: plans[n][1](loaded[n]) for n in names}
