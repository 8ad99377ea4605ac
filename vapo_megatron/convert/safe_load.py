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

* megatron-core's legacy ``common.pt`` (``dist_checkpointing.strategies.common.load_common`` calls ``torch.load``
  without ``weights_only``, which ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1`` turns into a plain unpickling): inside
  :func:`restricted_dcp_load` it is loaded with an explicit ``weights_only=True`` (the variable only overrides calls
  that do not say), and the variable itself is removed from the environment for the duration of the block, so no
  ``torch.load`` on that path can be switched to running code. (The trainer never writes a ``common.pt``; its
  manifest refuses one before any of this runs: engine/manifest.py.)

Anything else is refused with :class:`~vapo_megatron.errors.UnsafeCheckpointError` unless the caller trusts the
checkpoint (``checkpoint.trust_checkpoints``), which restores torch's own, unrestricted loading. A file that is
not a pickle at all (truncated, damaged) is a :class:`~vapo_megatron.errors.CheckpointError` naming it: trusting
the checkpoint would not help.
"""
from __future__ import annotations

import contextlib
import io
import os
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from vapo_megatron.errors import CheckpointError, UnsafeCheckpointError

_TRUST_HINT = ("if you made this checkpoint yourself or trust its origin, set checkpoint.trust_checkpoints=true "
               "(such a file can run code when loaded)")
_DCP_MODULE = "torch.distributed.checkpoint"
_PLAIN_BUILTINS = frozenset({"set", "frozenset", "slice", "complex", "bytearray", "range"})
_NO_WEIGHTS_ONLY_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


class _ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle that asks for a global outside the allowlist (as opposed to one that is damaged)."""


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
        raise _ForbiddenGlobal(f"global {module}.{name} is not allowed")


class _RestrictedPickleModule:
    """Stands in for the ``pickle`` module inside torch's filesystem reader: ``load`` is restricted."""

    def __getattr__(self, name: str) -> Any:
        return getattr(pickle, name)

    @staticmethod
    def load(file: Any, **kwargs: Any) -> Any:
        where = getattr(file, "name", "a torch_dist .metadata file")
        try:
            return _RestrictedUnpickler(file).load()
        except _ForbiddenGlobal as e:
            raise _refuse(f"{where}: {e}; refused. {_TRUST_HINT}") from None
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as e:
            raise _damaged(f"{where} is damaged: it does not unpickle ({type(e).__name__}: {e}); it was truncated "
                           "or overwritten after it was saved") from None


_REFUSALS: list[Exception] = []


def _refuse(message: str) -> UnsafeCheckpointError:
    """The error to raise, also recorded: torch DCP wraps exceptions of its load steps in CheckpointException,
    and :func:`restricted_dcp_load` raises the recorded refusal instead."""
    error = UnsafeCheckpointError(message)
    _REFUSALS.append(error)
    return error


def _damaged(message: str) -> CheckpointError:
    error = CheckpointError(message)
    _REFUSALS.append(error)
    return error


def _weights_only_load_common(checkpoint_dir: Any) -> Any:
    """megatron-core's ``load_common`` (a legacy ``common.pt``) with ``weights_only=True`` said explicitly."""
    from megatron.core.dist_checkpointing.mapping import CheckpointingException

    path = Path(checkpoint_dir) / "common.pt"
    if not path.is_file():
        raise CheckpointingException(f"Common file {path} does not exist")
    try:
        return load_torch_file(path, trust=False)
    except UnsafeCheckpointError as e:
        _REFUSALS.append(e)
        raise


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
    from megatron.core.dist_checkpointing import serialization
    from megatron.core.dist_checkpointing.strategies import common
    from torch.distributed.checkpoint import default_planner, filesystem

    saved = (filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes, serialization.load_common,
             common.load_common)
    forced = os.environ.pop(_NO_WEIGHTS_ONLY_ENV, None)  # no torch.load in the block may default to pickle
    filesystem.pickle = _RestrictedPickleModule()
    default_planner.DefaultLoadPlanner.load_bytes = _safe_load_bytes
    serialization.load_common = common.load_common = _weights_only_load_common
    _REFUSALS.clear()
    try:
        yield
    except BaseException:  # torch DCP's CheckpointException derives from BaseException
        if _REFUSALS:
            raise _REFUSALS[0] from None
        raise
    finally:
        _REFUSALS.clear()
        (filesystem.pickle, default_planner.DefaultLoadPlanner.load_bytes, serialization.load_common,
         common.load_common) = saved
        if forced is not None:
            os.environ[_NO_WEIGHTS_ONLY_ENV] = forced
