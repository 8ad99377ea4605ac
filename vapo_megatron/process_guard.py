"""No child process outlives the trainer, even after ``kill -9``.

What the trainer starts and why each now ends with it:

* reward workers (rewards/manager.py): ask the kernel for SIGKILL when their parent dies
  (:func:`die_with_parent`, Linux ``PR_SET_PDEATHSIG``); a worker busy in a long reward call would otherwise run
  on until that call ends. Each worker leads its own process group, and a worker that is stopped (timeout, early
  stop, close) is stopped with that group, so a program a reward started ends too; after a kill -9 of the
  trainer only the worker itself is the kernel's to kill (a reward's own programs then end when they end);
* megatron-core's torch_dist writer collected its results through a ``multiprocessing.Manager().Queue()``, a
  server process (~280 MB) that survives a killed parent. Our saves are synchronous (writer threads in this
  process), so a thread-safe in-process queue serves the same purpose (:func:`avoid_checkpoint_manager_process`);
* multiprocessing's resource tracker exits when the last process holding its pipe exits, i.e. with the above.
"""
from __future__ import annotations

import ctypes
import queue
import signal
import sys

_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL) -> bool:
    """Have the kernel send ``sig`` to this process when its parent exits (Linux); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def avoid_checkpoint_manager_process() -> None:
    """Give megatron-core's synchronous torch_dist writer an in-process results queue, so that it never starts a
    ``multiprocessing.Manager`` server (which would outlive a killed trainer). Call before the first save; not
    for megatron's async saves (not used here), whose writer runs in another process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if getattr(filesystem_async, "_results_queue", None) is None:
        filesystem_async._results_queue = queue.Queue()
