"""Run a function on N gloo ranks from inside pytest, with no external launcher.

    def _body(tp):                      # module level, so that it pickles
        ...                             # torch.distributed is initialised (gloo); return anything picklable
    results = run_distributed(_body, 4, 2)   # list of return values, by rank

Each rank is a fresh process with RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT set
exactly as torchrun sets them (vLLM's external launcher and megatron-core read these). A failure on any rank
re-raises here with that rank's traceback; a rank that hangs fails the call after `timeout` seconds and every
rank is killed.

Ranks start from a fork server that has imported torch, megatron-core, transformers and vLLM once
(testing/_preload.py), not by `spawn`, which imports them again in every rank of every call: several seconds a rank
on 2 cores, for each of the suite's ~100 process groups. A forked rank is still a fresh process (the server never
initialises a process group, a thread pool or a device). `VAPO_TEST_START_METHOD=spawn` restores spawning; on CUDA
ranks are spawned.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import traceback
from collections.abc import Callable
from typing import Any

from vapo_megatron.platform import free_port


class DistributedTestError(RuntimeError):
    pass


def _worker(rank: int, world_size: int, port: int, fn_bytes: bytes, args: bytes, queue, env: dict):
    """One rank. `fn` and its arguments arrive pickled and are unpickled only after `platform.setup()`:
    unpickling imports the test module, which may import megatron-core, which needs the CPU shims first."""
    os.environ.update(env)
    if "OMP_NUM_THREADS" in env:  # the fork server may have started under another setting
        import torch

        torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        import torch.distributed as dist

        from vapo_megatron import platform

        platform.setup()  # the entry point of a spawned rank: shims before anything imports megatron-core
        fn, (fn_args, fn_kwargs) = pickle.loads(fn_bytes), pickle.loads(args)
        dist.init_process_group(platform.dist_backend(), rank=rank, world_size=world_size)
        result = fn(*fn_args, **fn_kwargs)
        queue.put((rank, True, pickle.dumps(result)))  # bytes: no shared-memory handles to outlive us
    except BaseException:  # noqa: BLE001 - report everything, including SystemExit, to the parent
        queue.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    import torch.distributed as dist

    try:
        from megatron.core import parallel_state

        parallel_state.destroy_model_parallel()
    except Exception:  # noqa: BLE001 - megatron may never have been initialised
        pass
    if dist.is_initialized():
        dist.destroy_process_group()


def _collect(procs, queue, timeout: float, results: dict, errors: dict) -> None:
    """Fill results/errors from the ranks; stop at the first error, a rank that died, or the timeout."""
    import queue as queue_mod
    import time

    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < len(procs) and not errors:
        try:
            rank, ok, payload = queue.get(timeout=1.0)
            if ok:
                from vapo_megatron import platform

                platform.install_shims()  # results may reference megatron classes
                results[rank] = pickle.loads(payload)
            else:
                errors[rank] = payload
            continue
        except queue_mod.Empty:
            pass
        for rank, p in enumerate(procs):
            if rank not in results and p.exitcode is not None and queue.empty():
                errors[rank] = f"process exited with code {p.exitcode} without a result"
        if time.monotonic() > deadline:
            missing = sorted(set(range(len(procs))) - set(results))
            raise DistributedTestError(f"ranks {missing} gave no result within {timeout:.0f}s")


def _context():
    """The fork server (imports preloaded) on CPU; `spawn` on CUDA or when VAPO_TEST_START_METHOD says so."""
    import torch

    method = os.environ.get("VAPO_TEST_START_METHOD", "spawn" if torch.cuda.is_available() else "forkserver")
    if method not in ("forkserver", "spawn"):
        raise ValueError(f"VAPO_TEST_START_METHOD={method!r}: expected 'forkserver' or 'spawn'")
    ctx = mp.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(["vapo_megatron.testing._preload"])
    return ctx


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 600.0,
                    env: dict | None = None, **kwargs: Any) -> list[Any]:
    """Run `fn(*args, **kwargs)` on `world_size` gloo ranks; return the per-rank results in rank order."""
    ctx = _context()
    queue = ctx.Queue()
    port = free_port()
    base_env = {"OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", **(env or {})}
    fn_bytes, arg_bytes = pickle.dumps(fn), pickle.dumps((args, kwargs))
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn_bytes, arg_bytes, queue, base_env),
                         daemon=False) for r in range(world_size)]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: dict[int, str] = {}
    try:
        _collect(procs, queue, timeout, results, errors)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise DistributedTestError(f"rank {rank} of {world_size} failed:\n{errors[rank]}")
    return [results[r] for r in range(world_size)]
