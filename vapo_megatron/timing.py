"""One step's wall-clock timings, collected by one object instead of a dict handed from phase to phase.

    timer = StepTimer()
    timer.start()                       # a new step: forget the last one's timings
    with timer("old_logprob"):          # adds the block's seconds to t_old_logprob
        ...
    timer.as_metrics()                  # {"t_old_logprob": ..., "t_step": ..., "t_other": ...}

A name entered several times in a step accumulates (the mini-batch updates); `timer.zero(name)` makes a name appear
with 0.0 even when its block never runs (e.g. `t_actor_update` during value pretraining). `t_step` is the time since
`start()`, `t_other` what the named blocks do not cover."""
from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class StepTimer:
    def __init__(self, clock=time.perf_counter) -> None:
        self._clock = clock
        self._start = clock()
        self._seconds: dict[str, float] = {}

    def start(self) -> None:
        """Begin a step: the clock of `t_step` restarts and every name is forgotten."""
        self._start = self._clock()
        self._seconds = {}

    def zero(self, *names: str) -> None:
        """Report `names` this step even if their blocks never run (0.0 unless they do)."""
        for name in names:
            self._seconds.setdefault(name, 0.0)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the block and add its seconds to `name` (kept even when the block raises)."""
        t0 = self._clock()
        try:
            yield
        finally:
            self._seconds[name] = self._seconds.get(name, 0.0) + self._clock() - t0

    def as_metrics(self) -> dict[str, float]:
        """`t_<name>` for every name in the order first timed, then `t_step` (since `start`) and `t_other`."""
        out = {f"t_{name}": seconds for name, seconds in self._seconds.items()}
        total = self._clock() - self._start
        return {**out, "t_step": total, "t_other": total - sum(out.values())}
