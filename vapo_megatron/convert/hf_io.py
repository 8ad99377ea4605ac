"""Streaming access to Hugging Face safetensors checkpoints: read one tensor at a time, write shard by shard.

Reading: a single `model.safetensors` or shards listed in `model.safetensors.index.json`. Every shard's
header is checked when the reader opens (a missing or truncated shard fails there, naming the file), then
tensors are read one at a time through `safetensors.safe_open`, which maps the file: a tensor costs no
memory until its pages are touched, and the mapping goes away with the tensor.

Writing: the names, shapes and dtypes of all tensors are known before any data exists (they follow from
the model's shape), so the writer plans the shards up front, writes each shard's header when the shard is
opened, and then appends every tensor's bytes as it arrives. A shard is closed when it reaches the size
limit. Nothing is buffered: peak memory is the tensor being written.
"""
from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vapo_megatron.convert.mapping import ShapeMismatchError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".index.json")

_ST_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
_TORCH_DTYPES = {v: k for k, v in _ST_DTYPES.items()}
_DTYPE_NAMES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """torch dtype from "bf16" / "bfloat16" / "fp32" / "float32" / "fp16" / "float16" (or a dtype)."""
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPE_NAMES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPE_NAMES)}")
    return _DTYPE_NAMES[name]


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16", "float32", ... (the spelling of HF configs)."""
    return str(dtype).removeprefix("torch.")


class MissingShardError(FileNotFoundError):
    """A checkpoint file that the index (or the directory layout) promises is not there."""


class TruncatedShardError(ValueError):
    """A safetensors file whose header cannot be read or whose data is shorter than its header says."""


class MissingTensorError(LookupError):
    """A tensor the model needs is in none of the checkpoint's files."""


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor, without its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


# ---- reading ---------------------------------------------------------------------------------------------

class HFCheckpointReader:
    """The tensors of a HF safetensors checkpoint directory, read one at a time."""

    def __init__(self, hf_dir: str | Path):
        from safetensors import SafetensorError, safe_open

        self.dir = Path(hf_dir)
        files = self._files()
        self._where: dict[str, Path] = {}
        self._specs: dict[str, TensorSpec] = {}
        for path in files:
            try:
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        sl = f.get_slice(name)
                        if sl.get_dtype() not in _TORCH_DTYPES:
                            raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {sl.get_dtype()}")
                        self._where[name] = path
                        self._specs[name] = TensorSpec(name, tuple(sl.get_shape()), _TORCH_DTYPES[sl.get_dtype()])
            except SafetensorError as exc:
                raise TruncatedShardError(f"{path}: cannot read it as safetensors ({exc}); the file is truncated "
                                          f"or corrupt (re-download it)") from exc
        self._check_index_agrees()

    def _files(self) -> list[Path]:
        index = self.dir / INDEX_FILE
        if index.is_file():
            self._weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(self._weight_map.values()))
            missing = [n for n in names if not (self.dir / n).is_file()]
            if missing:
                raise MissingShardError(f"{index} lists shard(s) that do not exist: "
                                        + ", ".join(str(self.dir / n) for n in missing))
            return [self.dir / n for n in names]
        self._weight_map = None
        single = self.dir / SINGLE_FILE
        if single.is_file():
            return [single]
        other = sorted(p.name for p in self.dir.glob("*") if p.suffix in (".bin", ".pt", ".pth"))
        hint = f" (found {other}: convert them to safetensors first)" if other else ""
        raise MissingShardError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.dir}{hint}")

    def _check_index_agrees(self) -> None:
        if self._weight_map is None:
            return
        for name, file in self._weight_map.items():
            where = self._where.get(name)
            if where is None or where.name != file:
                raise MissingTensorError(f"{self.dir / INDEX_FILE} says {name!r} is in {file}, but "
                                         f"{'it is in ' + where.name if where else 'no shard contains it'}")

    @property
    def files(self) -> list[Path]:
        return sorted(set(self._where.values()))

    def names(self) -> list[str]:
        return list(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs

    def spec(self, name: str) -> TensorSpec:
        self._require(name)
        return self._specs[name]

    def _require(self, name: str) -> None:
        if name not in self._specs:
            files = ", ".join(p.name for p in self.files)
            raise MissingTensorError(f"tensor {name!r} is not in the checkpoint {self.dir} "
                                     f"({len(self._specs)} tensors in {files})")

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (memory-mapped: pages are read when touched, released with the tensor)."""
        from safetensors import safe_open

        self._require(name)
        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for s in self._specs.values())


# ---- writing ---------------------------------------------------------------------------------------------

def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split `specs`, in order, into shards of at most `max_shard_bytes` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards if shards[0] else []


def _header(specs: Sequence[TensorSpec]) -> bytes:
    entries: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for s in specs:
        entries[s.name] = {"dtype": _ST_DTYPES[s.dtype], "shape": list(s.shape),
                           "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(entries, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors pads the header with spaces to an 8-byte boundary
    return struct.pack("<Q", len(raw)) + raw


class SafetensorsShardWriter:
    """Write tensors, in the planned order, into HF-style shards `model-0000i-of-0000n.safetensors` and an
    index. Use as a context manager; `write(name, tensor)` for every spec, in order."""

    def __init__(self, out_dir: str | Path, specs: Iterable[TensorSpec], *,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES):
        self.dir = Path(out_dir)
        self.shards = plan_shards(list(specs), max_shard_bytes)
        n = len(self.shards)
        self.file_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._queue = [(i, s) for i, shard in enumerate(self.shards) for s in shard]
        self._next = 0
        self._stream = None
        self.bytes_written = 0

    def __enter__(self) -> SafetensorsShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        if exc_type is None:
            self.close()

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self._next >= len(self._queue):
            raise ValueError(f"unexpected tensor {name!r}: all {len(self._queue)} planned tensors are written")
        shard, spec = self._queue[self._next]
        if name != spec.name:
            raise ValueError(f"tensors must arrive in the planned order: expected {spec.name!r}, got {name!r}")
        if tuple(tensor.shape) != spec.shape:
            raise ShapeMismatchError(f"{name}: expected shape {spec.shape}, got {tuple(tensor.shape)}")
        if tensor.dtype != spec.dtype:
            raise TypeError(f"{name}: expected dtype {spec.dtype}, got {tensor.dtype}")
        if self._stream is None:
            self._stream = open(self.dir / self.file_names[shard], "wb")  # noqa: SIM115 - closed below
            self._stream.write(_header(self.shards[shard]))
        data = tensor.detach().to("cpu").contiguous().reshape(-1)
        self._stream.write(data.view(torch.uint8).numpy().data)
        self.bytes_written += spec.nbytes
        self._next += 1
        if self._next == len(self._queue) or self._queue[self._next][0] != shard:
            self._stream.close()
            self._stream = None

    def close(self) -> None:
        """Check that every planned tensor arrived and write the index."""
        if self._next != len(self._queue):
            missing = [s.name for _, s in self._queue[self._next:]]
            raise ValueError(f"{len(missing)} planned tensors were never written, first {missing[:3]}")
        weight_map = {s.name: self.file_names[i] for i, s in self._queue}
        index = {"metadata": {"total_size": sum(s.nbytes for _, s in self._queue)},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")


# ---- the other files of a HF model directory -------------------------------------------------------------

def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_SUFFIXES)


def copy_hf_assets(src: str | Path, dst: str | Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy the non-weight files of a HF model directory (config.json, tokenizer files, chat template,
    generation_config.json, README/LICENSE) from `src` to `dst`; return the copied names."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    skip = set(skip)
    copied = []
    for path in sorted(src.iterdir()):
        if path.is_file() and not path.name.startswith(".") and not is_weight_file(path.name) \
                and path.name not in skip:
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
