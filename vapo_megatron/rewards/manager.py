"""Score a batch of responses with per-call timeouts, so that a reward function that raises or hangs never
stops the run.

Why processes: a Python thread cannot be stopped, so a reward stuck in sympy or in a user's infinite loop would
hold a thread (and the GIL) for good; math-verify's own SIGALRM timeouts only work in a main thread. So rewards
run in worker processes (each in its own main thread); a worker that overruns ``timeout_s`` on one call is
killed and replaced, that item scores ``failure_score`` and is counted in ``RewardStats.num_timeouts``, and the
remaining items of its share are sent to the replacement. One message carries a worker's whole share of the
batch and each result comes back as soon as it is computed, so a batch costs one round trip per worker while
every call still gets its own deadline.

A raising reward (or one returning something that is not a finite number: NaN, a string ``"1.0"``) scores
``failure_score`` and is counted in ``num_errors``; the first traceback of each kind of failure is printed once
(stderr), and ``RewardStats.first_failure`` keeps the first failing item of the batch, so that the trainer can
stop on a systematic failure (:func:`systematic_failure`) instead of training on failure scores.
Rewards registered ``in_process_safe`` (bounded work, like ``synthetic``) run in the calling process
when every reward used is safe: no process start-up, no pickling; they still cannot crash the run.
"""
from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import pickle
import signal
import sys
import time
import traceback
import weakref
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from vapo_megatron.rewards.calling import call_reward, check_reward_signature, describe
from vapo_megatron.rewards.registry import (
    RewardSpec,
    get_registered,
    is_custom_spec,
    resolve_reward,
    score_from_output,
)

DEFAULT_KEY = ""
MAX_ERROR_EXAMPLES = 5


@dataclass(frozen=True)
class RewardItem:
    """One response to score; the fields are the reward function's arguments."""

    response: str
    ground_truth: str
    prompt: str = ""
    data_source: str = ""
    extra: dict[str, Any] | None = None


@dataclass
class RewardStats:
    """What happened while scoring one batch."""

    num_items: int = 0
    num_errors: int = 0
    """Calls that raised, returned a non-score, or whose worker died."""
    num_timeouts: int = 0
    """Calls stopped after ``timeout_s`` (their worker was killed and replaced)."""
    num_not_scored: int = 0
    """Items never scored because the batch's failure limit was already crossed (``score(max_failed=...)``)."""
    num_worker_restarts: int = 0
    seconds: float = 0.0
    error_examples: list[str] = field(default_factory=list)
    """The first few error messages, for the log."""
    first_failure: dict[str, Any] | None = None
    """The first failing item: ``function``, ``message``, ``traceback``, ``item`` (its fields)."""

    @property
    def num_failed(self) -> int:
        return self.num_errors + self.num_timeouts + self.num_not_scored

    def as_metrics(self, prefix: str = "reward/") -> dict[str, float]:
        return {f"{prefix}num_errors": float(self.num_errors), f"{prefix}num_timeouts": float(self.num_timeouts),
                f"{prefix}worker_restarts": float(self.num_worker_restarts), f"{prefix}seconds": self.seconds}


@dataclass
class RewardResults:
    """Scores in the order of the items, per-item status (``"ok"``, ``"error"``, ``"timeout"``), the extra
    values of rewards that return dicts, and the batch's stats."""

    scores: list[float]
    status: list[str]
    extras: list[dict[str, Any]]
    stats: RewardStats


def _call_reward(fn: Any, item: tuple, reward_kwargs: Mapping[str, Any]) -> tuple[float, dict[str, Any]]:
    return score_from_output(call_reward(fn, item, reward_kwargs))


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _worker_main(conn: Connection, specs: dict[str, RewardSpec], reward_kwargs: dict[str, Any],
                 parent_pid: int) -> None:
    """Worker loop: resolve the rewards, say ready, then score every received share item by item."""
    from vapo_megatron.process_guard import die_with_parent

    # Its own process group, so that stopping the worker also stops what a reward started (a code-execution
    # reward's program: killing the worker alone left such a process running after the run had ended).
    os.setpgid(0, 0)
    die_with_parent()  # a kill -9 of the trainer must not leave a worker running a long reward call
    if os.getppid() != parent_pid:  # the trainer died while this worker started, before the line above
        return
    try:
        fns = {key: resolve_reward(spec) for key, spec in specs.items()}
    except BaseException as e:  # report any set-up failure instead of dying silently
        conn.send(("fatal", _describe(e)))
        return
    conn.send(("ready",))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "stop":
            return
        for pos, key, item in message[1]:
            try:
                score, extras = _call_reward(fns[key], item, reward_kwargs)
                conn.send(("ok", pos, score, extras))
            except Exception as e:  # the parent counts it; the worker lives on
                conn.send(("error", pos, _describe(e), traceback.format_exc()))


class _Worker:
    """One worker process and the share of the current batch it still owes."""

    def __init__(self, ctx: Any, specs: dict[str, RewardSpec], reward_kwargs: dict[str, Any]) -> None:
        self.conn, child = ctx.Pipe()
        # daemon: never outlive the trainer, even if close() is not reached.
        self.process = ctx.Process(target=_worker_main, args=(child, specs, reward_kwargs, os.getpid()),
                                   daemon=True, name="vapo-reward-worker")
        self.process.start()
        child.close()
        self.ready = False
        self.pending: deque[tuple[int, str, tuple]] = deque()
        self.deadline = float("inf")

    def kill(self) -> None:
        """Stop the worker and whatever its reward call started: SIGTERM to the worker's process group, up to
        TERM_GRACE_S to exit, then SIGKILL to the group, to the worker and to every descendant seen before (one
        that left the group); joined. A worker still starting (no group of its own yet) gets the same through
        its pid."""
        pid = self.process.pid
        if pid is not None and self.process.exitcode is None:
            descendants = _descendants(pid)  # now: once the worker is gone they are re-parented out of reach
            _signal_group(pid, signal.SIGTERM, self.process)
            self.process.join(timeout=TERM_GRACE_S)
            _signal_group(pid, signal.SIGKILL, self.process)
            for proc in descendants:
                with contextlib.suppress(Exception):
                    proc.kill()
        self.process.join(timeout=5)
        self.conn.close()


TERM_GRACE_S = 1.0
"""How long a stopped worker may take to exit after SIGTERM before it and its group get SIGKILL."""


def _descendants(pid: int) -> list:
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal_group(pid: int, sig: int, process: Any) -> None:
    """`sig` to the process group the worker `pid` leads, or to the worker alone while it has none yet."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
            return
    except OSError:  # gone already (or a zombie: getpgid of an exited, unreaped child)
        pass
    if process.exitcode is None:
        with contextlib.suppress(OSError):
            os.kill(pid, sig)


def _shutdown(workers: list[_Worker]) -> None:
    for w in workers:
        try:
            if w.ready and w.process.is_alive():
                w.conn.send(("stop",))
                w.process.join(timeout=1)
        except (OSError, ValueError):
            pass
        w.kill()
    workers.clear()


class RewardManager:
    """Scores batches of :class:`RewardItem` with one default reward and optional rewards per ``data_source``.

    Args:
        reward: the default reward: a registered name, ``"file.py:function"``, ``"module:function"`` or a
            module-level callable.
        by_data_source: rewards for items whose ``data_source`` is a key here (the others use ``reward``).
        reward_kwargs: fixed keyword arguments passed to every reward call (e.g. ``correct_score``,
            ``incorrect_score`` of the built-in rewards).
        failure_score: the score of a call that raised or timed out; defaults to
            ``reward_kwargs["incorrect_score"]`` if given, else 0.0.
        timeout_s: per-call limit in worker processes.
        num_workers: worker processes (a batch is split evenly among them).
        in_process: run rewards in this process (no timeout); default: only when every reward used is a
            registered ``in_process_safe`` one.
        startup_timeout_s: how long a worker may take to start and import the rewards.
    """

    def __init__(self, reward: RewardSpec = "math", *, by_data_source: Mapping[str, RewardSpec] | None = None,
                 reward_kwargs: Mapping[str, Any] | None = None, failure_score: float | None = None,
                 timeout_s: float = 10.0, num_workers: int = 1, in_process: bool | None = None,
                 startup_timeout_s: float = 120.0, mp_context: str = "spawn") -> None:
        if timeout_s <= 0 or num_workers < 1 or startup_timeout_s <= 0:
            raise ValueError(f"need timeout_s > 0, num_workers >= 1, startup_timeout_s > 0; got timeout_s="
                             f"{timeout_s}, num_workers={num_workers}, startup_timeout_s={startup_timeout_s}")
        self.specs: dict[str, RewardSpec] = {DEFAULT_KEY: reward, **dict(by_data_source or {})}
        # Resolve here too, so that a missing file or misspelt name fails now, not in a worker mid-run.
        self._fns = {key: resolve_reward(spec) for key, spec in self.specs.items()}
        self.reward_kwargs = dict(reward_kwargs or {})
        for fn in self._fns.values():
            check_reward_signature(fn, self.reward_kwargs)
        self._printed_kinds: set[tuple[str, str]] = set()
        self._jobs: list[tuple[int, str, tuple]] = []
        self._max_failed: int | None = None
        self.failure_score = float(self.reward_kwargs.get("incorrect_score", 0.0) if failure_score is None
                                   else failure_score)
        self.timeout_s, self.num_workers, self.startup_timeout_s = timeout_s, num_workers, startup_timeout_s
        self.in_process = all(_in_process_safe(s) for s in self.specs.values()) if in_process is None \
            else in_process
        self._ctx = mp.get_context(mp_context)
        self._worker_specs = {} if self.in_process else {k: _worker_spec(s) for k, s in self.specs.items()}
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    def score(self, items: Sequence[RewardItem], *, max_failed: int | None = None) -> RewardResults:
        """Score every item; never raises for a failing reward call (see the module docstring). With
        ``max_failed``, stop as soon as more than that many calls failed (the batch is then certainly a systematic
        failure): the workers are killed at once (no hung call outlives the decision; a later batch starts fresh
        ones) and the unscored items count as ``not_scored`` failures."""
        start = time.monotonic()
        n = len(items)
        results = RewardResults(scores=[self.failure_score] * n, status=["ok"] * n, extras=[{} for _ in range(n)],
                                stats=RewardStats(num_items=n))
        jobs = [(pos, self._key(item), (item.response, item.ground_truth, item.prompt, item.data_source,
                                        item.extra)) for pos, item in enumerate(items)]
        self._jobs, self._max_failed = jobs, max_failed
        if self.in_process:
            self._score_in_process(jobs, results)
        elif jobs:
            self._score_in_workers(jobs, results)
        results.stats.seconds = time.monotonic() - start
        return results

    def __call__(self, items: Sequence[RewardItem]) -> RewardResults:
        return self.score(items)

    def start(self) -> None:
        """Start the worker processes now (otherwise the first ``score`` does) to overlap their start-up."""
        while not self.in_process and len(self._workers) < self.num_workers:
            self._workers.append(self._new_worker())

    def close(self) -> None:
        """Stop the worker processes."""
        self._finalizer()

    def __enter__(self) -> RewardManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _key(self, item: RewardItem) -> str:
        return item.data_source if item.data_source in self.specs else DEFAULT_KEY

    def _new_worker(self) -> _Worker:
        worker = _Worker(self._ctx, self._worker_specs, self.reward_kwargs)
        worker.deadline = time.monotonic() + self.startup_timeout_s
        return worker

    def _score_in_process(self, jobs: list[tuple[int, str, tuple]], results: RewardResults) -> None:
        for pos, key, item in jobs:
            try:
                results.scores[pos], results.extras[pos] = _call_reward(self._fns[key], item, self.reward_kwargs)
            except Exception as e:
                self._record_failure(results, pos, "error", _describe(e), traceback.format_exc())

    def describe(self, key: str = DEFAULT_KEY) -> str:
        """The reward used for ``key`` (a data source or the default), as its spec and its function."""
        spec = self.specs[key]
        return f"{spec if isinstance(spec, str) else ''} = {describe(self._fns[key])}".lstrip(" =")

    def _record_failure(self, results: RewardResults, pos: int, status: str, message: str,
                        trace: str = "") -> None:
        stats = results.stats
        results.scores[pos], results.status[pos] = self.failure_score, status
        if status == "timeout":
            stats.num_timeouts += 1
        else:
            stats.num_errors += 1
        if len(stats.error_examples) < MAX_ERROR_EXAMPLES:
            stats.error_examples.append(f"item {pos}: {message}")
        _, key, item = self._jobs[pos]  # jobs are in item order
        failure = {"function": self.describe(key), "message": message, "traceback": trace,
                   "item": dict(zip(("response", "ground_truth", "prompt", "data_source", "extra"), item))}
        if stats.first_failure is None:
            stats.first_failure = failure
        kind = (key, message.split(":", 1)[0] if status == "error" else status)
        if kind not in self._printed_kinds:  # the first of each kind once, then only counted
            self._printed_kinds.add(kind)
            print(f"reward failure ({status}) in {failure['function']}: {message}\n{trace}".rstrip(),
                  file=sys.stderr, flush=True)

    def _score_in_workers(self, jobs: list[tuple[int, str, tuple]], results: RewardResults) -> None:
        try:
            self._run_workers(jobs, results)
        except BaseException:
            # A worker that cannot start is a set-up error worth raising; leave no half-done state behind.
            _shutdown(self._workers)
            raise

    def _run_workers(self, jobs: list[tuple[int, str, tuple]], results: RewardResults) -> None:
        self.start()
        share = -(-len(jobs) // len(self._workers))
        for i, worker in enumerate(self._workers):
            worker.pending.extend(jobs[i * share:(i + 1) * share])
            if worker.ready and worker.pending:
                self._dispatch(worker, results)
        while any(w.pending for w in self._workers):
            if self._max_failed is not None and results.stats.num_failed > self._max_failed:
                self._abandon(results)
                return
            busy = [w for w in self._workers if w.pending]
            timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            for conn in wait([w.conn for w in busy], timeout=timeout):
                self._receive(next(w for w in busy if w.conn is conn), results)
            now = time.monotonic()
            for w in busy:
                if w.pending and now >= w.deadline and not w.conn.poll(0):
                    self._on_deadline(w, results)

    def _abandon(self, results: RewardResults) -> None:
        """The failure limit is crossed: the rest of the batch is not scored and every worker is stopped now."""
        for w in self._workers:
            for pos, _, _ in w.pending:
                results.scores[pos], results.status[pos] = self.failure_score, "not_scored"
                results.stats.num_not_scored += 1
            w.pending.clear()
        _shutdown(self._workers)

    def _dispatch(self, worker: _Worker, results: RewardResults) -> None:
        try:
            worker.conn.send(("score", list(worker.pending)))
        except OSError:  # the idle worker died since the last batch (e.g. killed for memory): start another
            self._replace(worker, results)
            return
        worker.deadline = time.monotonic() + self.timeout_s

    def _receive(self, worker: _Worker, results: RewardResults) -> None:
        try:
            message = worker.conn.recv()
        except (EOFError, OSError):
            code = worker.process.exitcode
            if not worker.ready:
                raise RuntimeError(f"a reward worker died while starting (exit code {code}); its stderr says why. "
                                   "(With the 'spawn' start method a script must create the manager under "
                                   "`if __name__ == '__main__':`.)") from None
            pos = worker.pending.popleft()[0]
            self._record_failure(results, pos, "error", f"the reward worker died (exit code {code})")
            self._replace(worker, results)
            return
        kind = message[0]
        if kind == "fatal":
            raise RuntimeError(f"a reward worker could not set up the rewards: {message[1]}")
        if kind == "ready":
            worker.ready = True
            if worker.pending:
                self._dispatch(worker, results)
            return
        pos = worker.pending.popleft()[0]
        assert pos == message[1], f"reward worker answered item {message[1]}, expected {pos}"
        if kind == "ok":
            results.scores[pos], results.extras[pos] = message[2], message[3]
        else:
            self._record_failure(results, pos, "error", message[2], message[3])
        worker.deadline = time.monotonic() + self.timeout_s

    def _on_deadline(self, worker: _Worker, results: RewardResults) -> None:
        if not worker.ready:
            raise RuntimeError(f"a reward worker did not start within startup_timeout_s={self.startup_timeout_s}")
        pos = worker.pending.popleft()[0]
        self._record_failure(results, pos, "timeout", f"timed out after {self.timeout_s} s")
        self._replace(worker, results)

    def _replace(self, worker: _Worker, results: RewardResults) -> None:
        """Kill a worker (stopping whatever it runs) and hand its remaining share to a fresh one."""
        worker.kill()
        fresh = self._new_worker()
        fresh.pending, worker.pending = worker.pending, deque()
        self._workers[self._workers.index(worker)] = fresh
        results.stats.num_worker_restarts += 1


def _in_process_safe(spec: RewardSpec) -> bool:
    if not isinstance(spec, str) or is_custom_spec(spec):
        return False
    return get_registered(spec).in_process_safe


def _worker_spec(spec: RewardSpec) -> RewardSpec:
    """What to send a worker: ``target:function`` strings as they are (the worker loads them itself; a function
    loaded from a file cannot be pickled by reference), registered names and callables as the function, which
    must pickle by reference (a module-level function, not a lambda or closure)."""
    if is_custom_spec(spec):
        return spec
    fn = resolve_reward(spec)
    try:
        pickle.dumps(fn)
    except Exception as e:
        raise TypeError(f"reward {fn!r} cannot be sent to a worker process ({_describe(e)}); use a module-level "
                        "function, a 'file.py:function' string, or in_process=True (no timeout)") from e
    return fn


def systematic_failure(stats: RewardStats, max_failed_fraction: float) -> str | None:
    """A message when the rewards of a batch failed systematically: every call failed, or more than
    ``max_failed_fraction`` of them (errors and timeouts); None when the failures are rare enough to count only."""
    n, failed = stats.num_items, stats.num_failed
    if n == 0 or failed == 0 or (failed < n and failed <= max_failed_fraction * n):
        return None
    first = stats.first_failure or {}
    item = {k: (v[:300] + "..." if isinstance(v, str) and len(v) > 300 else v)
            for k, v in first.get("item", {}).items()}
    skipped = f", not scored after the limit was crossed {stats.num_not_scored}" if stats.num_not_scored else ""
    return (f"the reward function failed on {failed} of {n} responses (errors {stats.num_errors}, timeouts "
            f"{stats.num_timeouts}{skipped}; limit reward.max_failed_fraction={max_failed_fraction}), so training "
            f"would only see failure scores.\n  function: {first.get('function', '?')}\n  error: "
            f"{first.get('message', '?')}\n  first failing item: {item}\n"
            + (first.get("traceback") or "").rstrip())
