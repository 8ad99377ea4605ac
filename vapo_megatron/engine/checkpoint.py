"""Training checkpoints: model + optimizer of every role (megatron-core torch_dist), trainer state, RNG.

Layout under the run directory:

    checkpoints/
      latest                      name of the newest complete checkpoint (informational; replaced atomically)
      step_00000200/
        policy/  critic/          torch_dist (`dist_checkpointing.save`) of {"model": ..., "optimizer": ...},
                                  each written inside that role's parallel layout (any TP/PP/DP per role)
        trainer_state.pt          the caller's `trainer_state` (torch.save by rank 0: step, loader, counters...;
                                  tensors and plain Python values only: loaded with weights_only=True)
        rng/rank_00000.pt ...     python/numpy/torch (+CUDA, + megatron RNG tracker) states of every rank (plain
                                  values and tensors: weights_only=True)
        meta.json                 step, world size, per-role layout and `steps_taken`
        DONE                      written last
      step_00000300.tmp-1a2b3c4d/ a save in progress (or one that crashed: removed by the next save)

A save writes everything into `step_XXXXXXXX.tmp-<random>`, writes `DONE` after a barrier has shown that every
rank finished, and only then renames the directory into place. A crash at any point therefore leaves either
the new complete checkpoint or none under the final name: `latest_checkpoint` only ever returns a directory
named `step_XXXXXXXX` that holds `DONE`. Older checkpoints are deleted (rotation) only after the new one is
in place. torch_dist stores tensors in global coordinates, so a role may be resumed at another TP/PP/DP layout
(tests/e2e/test_resume_layouts.py, through the CLI on 2 ranks), a mixture-of-experts role at another EP too (its
experts have an optimizer of their own at every EP; `optim_resume.check_expert_layout`).

Integrity: the commit step writes `manifest.json` (engine/manifest.py: every file's size and checksum) before
`DONE`; `load_checkpoint` verifies it first and refuses a damaged, truncated, incomplete or unlisted file, naming
it. engine/resume.py picks what `--resume` loads: the newest complete checkpoint, or with `--resume=previous` the
newest older one that verifies (each skipped one printed, never silently).

Resuming is exact: with the optimizer state (Adam moments and per-parameter `step`), `steps_taken` (LR warmup)
and the RNG states restored, k steps + save + load + m steps equal k + m uninterrupted steps.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from vapo_megatron.convert import atomic
from vapo_megatron.convert.safe_load import load_torch_file, restricted_dcp_load
from vapo_megatron.engine import manifest as mf
from vapo_megatron.engine.optim_resume import (
    adopt_current_param_groups,
    check_expert_layout,
    compare_settings,
    optimizer_settings,
)
from vapo_megatron.engine.optim_state import (
    ensure_adam_state,
    fill_zero_common_step,
    loaded_parts,
    patch_distributed_optimizer_step_copy,
    restore_per_param_step,
    uses_distributed_optimizer,
)
from vapo_megatron.errors import CheckpointError

if TYPE_CHECKING:
    from vapo_megatron.engine.model_engine import ModelEngine

CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"
DONE_FILE = "DONE"
META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.pt"
RNG_DIR = "rng"
FORMAT = "vapo-megatron-train-checkpoint"
_STEP_RE = re.compile(r"^step_(\d{8})$")
_TMP_RE = re.compile(r"^step_\d{8}\.tmp-")
_STALE_RE = re.compile(r"^(step_\d{8}\.tmp-.+|\.step_\d{8}\.(old|partial|trash)|\.latest\.tmp-\d+)$")
# DistributedOptimizer format that loads at any DP size (the default one fails with the torch-Adam fallback:
# "flattened_range is not supported").
_DIST_OPT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


# ---- locating checkpoints (no megatron, no collectives) ---------------------------------------------------

def checkpoints_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    return _STEP_RE.match(path.name) is not None and (path / DONE_FILE).is_file()


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """The complete checkpoints of the run, oldest first (tmp directories and ones without DONE ignored)."""
    root = checkpoints_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(_STEP_RE.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run, or None."""
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def checkpoint_step(path: str | Path) -> int:
    m = _STEP_RE.match(Path(path).name)
    if m is None:
        raise CheckpointError(f"{path} is not a checkpoint directory (expected a name like step_00000100)")
    return int(m.group(1))


def resolve_checkpoint(path: str | Path) -> Path:
    """`path` is a checkpoint directory (`.../checkpoints/step_XXXXXXXX`) or a run directory (then its newest
    complete checkpoint). Raises FileNotFoundError / CheckpointError with the reason when there is none."""
    path = Path(path)
    if (_STEP_RE.match(path.name) or _TMP_RE.match(path.name) or (path / DONE_FILE).exists()
            or (path / META_FILE).exists()):
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint {path} does not exist")
        if not (path / DONE_FILE).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete (no {DONE_FILE} marker: its save was "
                                  f"interrupted); resume from latest_checkpoint() of the run instead")
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"no checkpoint in {checkpoints_root(path)}")
    return found


# ---- RNG ----------------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """This process's random states: python, numpy, torch CPU (+ CUDA) and megatron's model-parallel tracker."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np

        kind, keys, pos, has_gauss, cached = np.random.get_state()
        # plain types and a tensor, so that the file loads with weights_only=True
        state["numpy"] = (str(kind), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    except ImportError:
        pass
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    tracker = _rng_tracker()
    if tracker is not None:
        state["megatron_tracker"] = {k: v.clone() for k, v in tracker.get_states().items()}
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.int64).astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    tracker = _rng_tracker()
    if tracker is not None and state.get("megatron_tracker"):
        tracker.set_states({k: v.clone() for k, v in state["megatron_tracker"].items()})


def _clone(states: dict | None) -> dict | None:
    return None if states is None else {k: v.clone() for k, v in states.items()}


def _rng_tracker():
    try:
        from megatron.core import tensor_parallel

        tracker = tensor_parallel.get_cuda_rng_tracker()
    except Exception:  # noqa: BLE001 - megatron absent or not initialised: nothing to capture
        return None
    return tracker if getattr(tracker, "states_", None) else None


def _sharded_state_dict(engine: ModelEngine, *, is_loading: bool) -> dict:
    """{"model": ..., "optimizer": ...} of this rank (call inside the role's layout)."""
    from vapo_megatron.convert.dist_ckpt import unwrap

    ensure_adam_state(engine.optimizer)
    sd = {"model": unwrap(engine.model).sharded_state_dict()}
    sd["optimizer"] = engine.optimizer.sharded_state_dict(sd, is_loading=is_loading, metadata=_DIST_OPT_METADATA)
    return sd


# ---- save ---------------------------------------------------------------------------------------------------

def _agree(payload: Any) -> Any:
    """Rank 0's value on every rank (also a barrier). An exception object raises everywhere."""
    box = [payload]
    dist.broadcast_object_list(box, src=0)
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def _clean_stale(root: Path) -> None:
    for p in root.iterdir():
        if not _STALE_RE.match(p.name):
            continue
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _prepare_tmp(root: Path, step: int) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    _clean_stale(root)  # left behind by a crashed save or rotation
    tmp = root / f"{checkpoint_name(step)}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _save_role(engine: ModelEngine, role_dir: Path) -> None:
    """model + optimizer of one role into `role_dir` (collective over all ranks, in the role's layout)."""
    from megatron.core import dist_checkpointing

    from vapo_megatron.process_guard import avoid_checkpoint_manager_process

    avoid_checkpoint_manager_process()  # no Manager server process that would outlive a killed trainer
    if dist.get_rank() == 0:
        role_dir.mkdir()
    dist.barrier()  # dist_checkpointing.save wants the (empty) directory to exist on every rank
    # confined (docs/architecture.md): the optimizer's sharded_state_dict reads megatron's globals
    with engine.groups.megatron_globals():
        dist_checkpointing.save(_sharded_state_dict(engine, is_loading=False), str(role_dir))


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _meta(step: int, engines: Mapping[str, ModelEngine]) -> dict:
    roles = {}
    for role, eng in engines.items():
        par = eng.parallel
        roles[role] = {"tp": par.tp, "pp": par.pp, "cp": par.cp, "ep": par.ep, "etp": par.etp,
                       "sequence_parallel": par.sequence_parallel,
                       "steps_taken": eng.steps_taken,
                       "distributed_optimizer": uses_distributed_optimizer(eng.optimizer),
                       # the experts' own optimizer at every EP (models/moe.py tag_expert_parameters)
                       "expert_optimizer": bool(eng.arch.is_moe),
                       "optimizer": optimizer_settings(eng)}
    return {"format": FORMAT, "version": 1, "step": step, "world_size": dist.get_world_size(), "roles": roles}


def _rotate(root: Path, keep_last: int, newest: Path) -> None:
    complete = [p for p in list_checkpoints(root.parent) if p != newest]
    excess = len(complete) + 1 - keep_last
    for old in complete[:max(0, excess)]:
        trash = root / f".{old.name}.trash"
        old.rename(trash)  # no longer looks like a checkpoint from here on, even if rmtree is interrupted
        shutil.rmtree(trash, ignore_errors=True)


def _write_manifest(tmp: Path) -> None:
    """The commit step's checksums (collective): rank 0 lists the files, every rank hashes its share of them
    (engine/manifest.py), rank 0 writes manifest.json."""
    listing: Any = None
    if dist.get_rank() == 0:
        names = mf.checkpoint_files(tmp)
        listing = (names, [(tmp / n).stat().st_size for n in names])
    names, sizes = _agree(listing)
    mine = [names[i] for i in mf.share(names, sizes, dist.get_rank(), dist.get_world_size())]
    try:
        entries: Any = mf.hash_entries(tmp, mine)
    except OSError as exc:
        entries = exc
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, entries)
    failed = next((p for p in parts if isinstance(p, BaseException)), None)
    if failed is not None:
        raise CheckpointError(f"could not checksum the checkpoint in {tmp}: {failed}")
    if dist.get_rank() == 0:
        mf.write_manifest_file(tmp, {k: v for p in parts for k, v in p.items()}, mf.default_algorithm())
    dist.barrier()


def _save_failed(exc: BaseException, step: int, where: Path, run_dir: str | Path) -> CheckpointError:
    """A save that failed while writing (a full disk: torch DCP wraps the writer's error, e.g. "No space left on
    device" or torch's "unexpected pos ...", in a RuntimeError "Worker failure ..."), as one CheckpointError naming
    the step, the directory, the error's last line, the free space there and the checkpoint a --resume would
    continue from (the traceback stays behind --debug)."""
    chain, seen = [], exc
    while seen is not None and len(chain) < 10:
        chain.append(seen)
        seen = seen.__cause__ or seen.__context__
    os_error = next((e for e in chain if isinstance(e, OSError)), None)
    lines = [x.strip() for x in str(os_error or exc).splitlines() if x.strip()]
    reason = f"{type(os_error or exc).__name__}: {lines[-1] if lines else ''}"
    try:
        free = f"; free space there: {shutil.disk_usage(Path(run_dir)).free / 2**20:.0f} MiB"
    except OSError:
        free = ""
    newest = latest_checkpoint(run_dir)
    after = (f"the newest complete checkpoint is still {newest} (this save left only a temporary directory, "
             f"removed by the next save); free space and continue from it with --resume") if newest else \
        "there is no complete checkpoint of this run yet"
    return CheckpointError(f"saving the checkpoint of step {step} failed while writing {where} ({reason}{free}); "
                           f"{after}")


def save_checkpoint(run_dir: str | Path, step: int, engines: Mapping[str, ModelEngine], trainer_state: dict,
                    *, keep_last: int | None = 2) -> Path:
    """Save model + optimizer of every engine, `trainer_state` and the RNG states of every rank as
    `run_dir/checkpoints/step_{step:08d}` (collective: call on every rank with the same arguments).

    Atomic (tmp directory, DONE marker, rename); afterwards the `latest` pointer is updated and only the newest
    `keep_last` complete checkpoints are kept (None or <= 0: keep all). Returns the checkpoint directory."""
    if not engines:
        raise ValueError("save_checkpoint needs at least one engine")
    root = checkpoints_root(run_dir)
    final = root / checkpoint_name(int(step))
    mine = (int(step), sorted(engines))
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine)
    if any(v != mine for v in views):
        raise ValueError(f"save_checkpoint called with different (step, roles) on different ranks: {views}")

    tmp: Any = None
    if dist.get_rank() == 0:
        try:
            tmp = _prepare_tmp(root, int(step))
        except OSError as exc:
            tmp = exc
    tmp = Path(_agree(tmp))

    for role in sorted(engines):
        if engines[role].role != role:
            raise ValueError(f"engine under key {role!r} is the {engines[role].role!r} engine")
        try:
            _save_role(engines[role], tmp / role)
        except (Exception, CheckpointException) as exc:  # a failed write (disk full): one clear message
            # (torch DCP's CheckpointException derives from BaseException)
            raise _save_failed(exc, int(step), tmp / role, run_dir) from exc

    rng_dir = tmp / RNG_DIR
    if dist.get_rank() == 0:
        rng_dir.mkdir()
    dist.barrier()
    rng = capture_rng_state()
    rng["megatron_tracker_roles"] = {role: _clone(engines[role].groups.rng_states) for role in sorted(engines)}
    failed: Any = None
    try:
        torch.save(rng, rng_dir / f"rank_{dist.get_rank():05d}.pt")
        if dist.get_rank() == 0:
            torch.save(dict(trainer_state, step=int(step)), tmp / TRAINER_STATE_FILE)
            (tmp / META_FILE).write_text(json.dumps(_meta(int(step), engines), indent=2) + "\n")
    except Exception as exc:  # noqa: BLE001 - reported on every rank below
        failed = _save_failed(exc, int(step), tmp, run_dir)
    views = [None] * dist.get_world_size()
    dist.all_gather_object(views, failed)  # also the barrier: every rank has written its files
    failed = next((v for v in views if v is not None), None)
    if failed is not None:
        raise failed
    result: Any = final
    _write_manifest(tmp)
    if dist.get_rank() == 0:
        try:
            _write_atomic(tmp / DONE_FILE, f"{int(step)}\n")
            atomic.commit(tmp, final)  # the rename: from here on the checkpoint is complete and visible
            _write_atomic(root / LATEST_FILE, final.name + "\n")
            if keep_last is not None and keep_last > 0:
                _rotate(root, keep_last, final)
        except Exception as exc:  # noqa: BLE001
            result = _save_failed(exc, int(step), final, run_dir)
    return Path(_agree(result if not isinstance(result, Path) else str(result)))


# ---- load ---------------------------------------------------------------------------------------------------

def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META_FILE).read_text())


def _load_role(engine: ModelEngine, role_dir: Path) -> None:
    from megatron.core import dist_checkpointing

    from vapo_megatron.convert.dist_ckpt import check_global_shapes, unwrap

    # confined (docs/architecture.md): sharded_state_dict and the optimizer's load read megatron's globals
    with engine.groups.megatron_globals():
        module = unwrap(engine.model)
        check_global_shapes(module.sharded_state_dict(), role_dir)  # names the tensor on an arch mismatch
        if uses_distributed_optimizer(engine.optimizer):
            patch_distributed_optimizer_step_copy()
        loaded = dist_checkpointing.load(_sharded_state_dict(engine, is_loading=True), str(role_dir))
        module.load_state_dict(loaded["model"])
        fill_zero_common_step(engine.optimizer, loaded["optimizer"])
        adopt_current_param_groups(engine.role, loaded_parts(engine.optimizer, loaded["optimizer"]))
        with torch.no_grad():  # the distributed optimizer copies into fp32 main params (views of leaf params)
            engine.optimizer.load_state_dict(loaded["optimizer"])
        restore_per_param_step(engine.optimizer)


_VERIFIED: set[tuple] = set()  # checkpoints this process verified (path, manifest mtime and size)


def _verified_key(ckpt: Path) -> tuple | None:
    try:
        st = (ckpt / mf.MANIFEST_FILE).stat()
    except OSError:
        return None
    return str(ckpt.resolve()), st.st_mtime_ns, st.st_size


def checkpoint_problems(ckpt: str | Path) -> list[str]:
    """What is wrong with the bytes of checkpoint `ckpt` (engine/manifest.py), [] when it verifies. Collective:
    rank 0 reads the manifest and checks names and sizes, every rank hashes its share of the files."""
    ckpt = Path(ckpt)
    key = _verified_key(ckpt)
    if key is not None and _agree(key in _VERIFIED):
        return []
    head: Any = None
    if dist.get_rank() == 0:
        manifest, problem = mf.read_manifest(ckpt)
        head = (None, [problem]) if manifest is None else (manifest, mf.structural_problems(ckpt, manifest))
    manifest, problems = _agree(head)
    if not problems:
        names = sorted(manifest["files"])
        sizes = [manifest["files"][n]["size"] for n in names]
        mine = [names[i] for i in mf.share(names, sizes, dist.get_rank(), dist.get_world_size())]
        parts: list = [None] * dist.get_world_size()
        dist.all_gather_object(parts, mf.content_problems(ckpt, manifest, mine))
        problems = sorted(p for part in parts for p in part)
    if not problems and key is not None:
        _VERIFIED.add(key)
    return problems


def refusal(ckpt: Path, problems: list[str], offer: str = "") -> CheckpointError:
    """The error for a checkpoint that does not verify (the first problems, then `offer`)."""
    shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
    return CheckpointError(f"checkpoint {ckpt} does not verify, refused (nothing of it was loaded): {shown}"
                           + (f". {offer}" if offer else ""))


def load_checkpoint(path: str | Path, engines: Mapping[str, ModelEngine], *, map_location: Any = "cpu",
                    restore_rng: bool = True, trust: bool = False, verify: bool = True) -> dict:
    """Restore model + optimizer (+ `steps_taken`) of every engine and, by default, this rank's RNG states from
    the checkpoint `path` (or the newest one of the run directory `path`); return the saved trainer state
    (with its "step"). Collective: call on every rank. Nothing in the files runs code unless `trust`
    (convert/safe_load.py; UnsafeCheckpointError otherwise). With `verify` (default), nothing is read before the
    checkpoint's manifest verifies (`checkpoint_problems`; CheckpointError naming the damaged files otherwise).

    Raises FileNotFoundError ("no checkpoint in <run_dir>/checkpoints") when there is none, CheckpointError for
    an incomplete checkpoint or when its roles differ from `engines`."""
    ckpt = resolve_checkpoint(path)
    if verify:
        problems = checkpoint_problems(ckpt)
        if problems:
            raise refusal(ckpt, problems)
    meta = read_meta(ckpt)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}/{META_FILE} is not a {FORMAT} file")
    saved_roles, roles = sorted(meta["roles"]), sorted(engines)
    if saved_roles != roles:
        raise CheckpointError(f"checkpoint {ckpt} holds roles {saved_roles}, the trainer has {roles} "
                              f"(algorithm.use_critic changed?)")
    check_expert_layout(ckpt, meta, engines)
    changes = [compare_settings(role, meta["roles"][role].get("optimizer"), optimizer_settings(engines[role]))
               for role in roles]  # before anything loads: a change that cannot carry over is refused here
    for line in filter(None, changes):
        if dist.get_rank() == 0:
            print(f"resume: {line}", flush=True)
    for role in roles:
        if engines[role].role != role:
            raise ValueError(f"engine under key {role!r} is the {engines[role].role!r} engine")
        with restricted_dcp_load(trust):
            _load_role(engines[role], ckpt / role)
        engines[role].steps_taken = int(meta["roles"][role]["steps_taken"])

    if restore_rng:
        rng_file = ckpt / RNG_DIR / f"rank_{dist.get_rank():05d}.pt"
        if meta.get("world_size") == dist.get_world_size() and rng_file.is_file():
            rng = load_torch_file(rng_file, trust=trust)
            restore_rng_state(rng)
            for role, states in (rng.get("megatron_tracker_roles") or {}).items():
                if states is not None and role in engines:
                    engines[role].groups.rng_states = _clone(states)
        else:
            warnings.warn(f"{ckpt} was saved by {meta.get('world_size')} ranks, this run has "
                          f"{dist.get_world_size()}: RNG states not restored", stacklevel=2)
    state = load_torch_file(ckpt / TRAINER_STATE_FILE, trust=trust, map_location=map_location)
    dist.barrier()
    return state
