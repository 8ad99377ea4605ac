"""Loading checkpoint files without running code from them.

A pickle can call any importable function while it loads (``__reduce__``), so a checkpoint from someone else could
run code. What is loaded how:

* ``trainer_state.pt`` and ``rng/rank_*.pt``: ``torch.load(weights_only=True)`` (tensors and plain Python
  containers only; they are saved as such).
* megatron-core ``torch_dist`` directories (model + optimizer): their tensors are raw data; two parts are pickles
  in torch's DCP format: the ``.metadata`` file (read by torch with plain ``pickle.load``) and byte objects such as
  ``_extra_state`` and the optimizer's non-tensor state (read with ``torch.load(weights_only=False)``). Inside
  :func:`restricted_dcp_load` the first is read by an unpickler that only builds torch's DCP metadata classes,
  ``torch.Size`` and dtypes, and the second with ``weights_only=True``.

Anything else is refused with :class:`~vapo_megatron.errors.UnsafeCheckpointError` unless the caller trusts the
checkpoint (``checkpoint.trust_checkpoints``), which restores torch's own, unrestricted loading.
"""
from __future__ import annotations

import contextlib
import io
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vapo_megatron.errors import UnsafeCheckpointError

_TRUST_HINT = ("if you made this checkpoint yourself or trust its origin, set checkpoint.trust_checkpoints=true "
               "(such a file can run code when loaded)")
_DCP_MODULE = "torch.distributed.checkpoint"
_PLAIN_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "range"})


def load_torch_file(path: str | Path, *, trust: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` of a checkpoint file, with ``weights_only=True`` unless ``trust``; a file needing more is
    refused with UnsafeCheckpointError naming it (nothing in it has run)."""
    if trust:
        return torch.load(path, map_location=map_location, weights_only=False)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(f"{path} needs more than tensors and plain Python values to load "
                                    f"({_reason(e)}); refused. {_TRUST_HINT}") from None


def _reason(e: BaseException) -> str:
    """The line of torch's weights_only error that names the refused global."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    return next((x for x in lines if "global" in x.lower()), lines[0] if lines else type(e).__name__)


class _RestrictedUnpickler(pickle.Unpickler):
    """Builds only torch DCP metadata classes, torch dtypes / layouts / Size and a few plain builtins."""

    def find_class(self, module: str, name: str) -> Any:
        obj = super().find_class(module, name)
        if module == _DCP_MODULE or module.startswith(_DCP_MODULE + "."):
            if isinstance(obj, type):  # classes and enums, never functions
                return obj
        elif module == "torch" and (obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout,
                                                                              torch.memory_format))):
            return obj
        elif (module, name) == ("torch.serialization", "_get_layout") or (module, name) == ("collections",
                                                                                              "OrderedDict"):
            return obj
        elif module == "builtins" and name in _PLAIN_BUILTINS:
            return obj
        elif module == "pathlib" and name in ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
            return obj  # storage_meta.checkpoint_id
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside torch's filesystem reader: ``load`` is restricted."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        try:
            return _RestrictedUnpickler(file).load()
        except pickle.UnpicklingError as e:
            where = getattr(file, "name", "a torch_dist .metadata file")
            raise _refuse(f"{where}: {e}; refused. {_TRUST_HINT}") from None


_REFUSALS: list[UnsafeCheckpointError] = []


def _refuse(message: str) -> UnsafeCheckpointError:
    """The error to raise, also recorded: torch DCP wraps exceptions of its load steps in CheckpointException,
    and :func:`restricted_dcp_load` raises the recorded refusal instead."""
    error = UnsafeCheckpointError(message)
    _REFUSALS.append(error)
    return error


def _safe_load_bytes(self: Any, read_item: Any, value: io.BytesIO) -> None:
    """DefaultLoadPlanner.load_bytes with ``weights_only=True`` (torch's own uses False)."""
    from torch.distributed.checkpoint._traverse import set_element

    try:
        obj = torch.load(value, weights_only=True)
    except pickle.UnpicklingError as e:
        raise _refuse(f"the object {read_item.dest_index.fqn!r} of a torch_dist checkpoint needs more than "
                      f"tensors and plain values to load ({_reason(e)}); refused. {_TRUST_HINT}") from None
    if self.flatten_state_dict:
        set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
    else:
        self.state_dict[read_item.dest_index.fqn] = obj


@contextlib.contextmanager
def restricted_dcp_load(trust: bool = False) -> Iterator[None]:
    """Within the block, torch_dist loads (megatron-core ``dist_checkpointing.load``) unpickle only allowlisted
    types (module docstring); ``trust`` leaves torch's loading as it is."""
    if trust:
        yield
        return
    from torch.distributed.checkpoint import default_planner, filesystem

    saved = filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes
    filesystem.pickle = _RestrictedPickleModule()
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes
    _REFUSALS.clear()
    try:
        yield
    except BaseException:  # torch DCP's CheckpointException derives from BaseException
        if _REFUSALS:
            raise _REFUSALS[0] from None
        raise
    finally:
        _REFUSALS.clear()
        filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes = saved
