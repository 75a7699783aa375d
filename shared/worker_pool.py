"""A pool of worker processes with a deadline per job, which no dead, stuck or deadlocked worker can hang.

Used for the dense CRF (`shared.crf.CRFPool`) and PriMaPs' pseudo-masks: per-image CPU work in C libraries that
cannot be interrupted from Python. ``multiprocessing.Pool`` and ``ProcessPoolExecutor`` were not enough:

- ``Pool.map`` waits forever on a worker that died or is stuck, and ``Pool.terminate()`` sends SIGTERM, which a
  stuck worker (or one that inherited a training loop's SIGTERM handler) ignores, and then joins it;
- both share queue locks between all workers, so one worker that deadlocked right after the fork (a lock held by
  another thread of the parent at fork time) can block the others and the parent;
- stopping an executor's workers at once needs its private ``_processes``.

Here every worker has its own pipe, a job is handed over by a thread (a large job that a worker never reads costs
its deadline, not a blocked parent), and workers are stopped with SIGKILL. A job whose result has not arrived
``timeout_s`` after it was handed out, or whose worker died, is reported to the caller; its worker is replaced and
the others go on. An exception raised by the job function is re-raised in the caller, with the worker's traceback
as its ``__cause__``, after every worker is stopped.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from typing import Any


def default_start_method() -> str:
    # fork starts workers in milliseconds and needs no `if __name__ == "__main__"` guard in user scripts; the job
    # functions run numpy and C libraries only, so the parent's torch / CUDA state is never touched in a worker.
    return "fork" if sys.platform.startswith("linux") else "spawn"


def available_cores() -> int:
    """CPU cores this process may run on (respects taskset / cgroups affinity)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS / Windows
        return os.cpu_count() or 1


def _resolve(target: tuple[str, str]) -> Callable:
    """The function named (module, name), looked up now: a forked worker runs what the parent's module holds at
    the fork (tests replace functions), a spawned one imports the module."""
    module_name, name = target
    module = sys.modules.get(module_name) or importlib.import_module(module_name)
    return getattr(module, name)


def _worker_loop(conn, parent_pid: int, target: tuple[str, str], initializer: tuple[str, str] | None,
                 initargs: tuple) -> None:
    """A worker: receive a job (a tuple of arguments), send back ("ok", result) or ("error", exception, traceback)."""
    # The parent stops workers with SIGKILL, so whatever signal handlers this process inherited cannot keep it alive.
    if initializer is not None:
        _resolve(initializer)(*initargs)
    while True:
        try:
            while not conn.poll(1.0):
                if os.getppid() != parent_pid:  # the parent was killed: later workers hold copies of our pipe's
                    return  # other end, so no end-of-file would ever arrive
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        try:
            reply = ("ok", _resolve(target)(*job))
        except Exception as error:  # noqa: BLE001 - sent to the parent, which raises it
            reply = ("error", error, traceback.format_exc())
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - an exception that does not pickle still reaches the parent as text
            conn.send(("error", RuntimeError(repr(reply[1])), reply[-1]))


class WorkerError(Exception):
    """The traceback of an exception raised in a worker process (attached as ``__cause__``)."""


class _Worker:
    """One worker process with its own pipe: no lock is shared, so no dead or stuck worker can block another."""

    def __init__(self, ctx, name: str, target: tuple[str, str], initializer: tuple[str, str] | None,
                 initargs: tuple) -> None:
        self.conn, child_conn = ctx.Pipe()
        self.process = ctx.Process(target=_worker_loop, args=(child_conn, os.getpid(), target, initializer, initargs),
                                   daemon=True, name=name)
        self.process.start()
        child_conn.close()
        self.job: tuple[int, float] | None = None  # (job index, deadline) while busy
        self._sender: threading.Thread | None = None

    def send(self, job: tuple) -> None:
        """Hand over a job without blocking: a large job fills the pipe and waits for the worker to read it, and a
        worker that never reads (stuck since it was forked) must cost its deadline, not a hang here."""
        self._sender = threading.Thread(target=self._send, args=(job,), daemon=True, name="worker-send")
        self._sender.start()

    def _send(self, job: tuple) -> None:
        try:
            self.conn.send(job)
        except (OSError, ValueError):  # the worker was killed (its deadline passed) while the job was on its way
            pass

    def kill(self) -> None:
        # SIGKILL, not SIGTERM: a worker stuck in C code, or one that inherited a SIGTERM handler from a training
        # loop, ignores SIGTERM, and waiting for it would hang the caller.
        self.process.kill()
        self.process.join()
        if self._sender is not None:  # its send fails at once now that the worker is gone; let it end before the
            self._sender.join(timeout=5.0)  # pipe is closed under it
        self.conn.close()


def _name_of(function: Callable | tuple[str, str]) -> tuple[str, str]:
    """(module, name) of a module-level function; a (module, name) pair is taken as it is."""
    if isinstance(function, tuple):
        return function
    name = getattr(function, "__name__", "")
    module = getattr(function, "__module__", None)
    if not module or getattr(sys.modules.get(module), name, None) is not function:
        raise ValueError(f"a worker function must be a module-level function (got {function!r}), so that a worker "
                         "process can look it up by name.")
    return module, name


@dataclass
class Outcome:
    """What a :meth:`WorkerPool.run` did not deliver: jobs that missed their deadline, and jobs whose worker died."""

    late: list[int] = field(default_factory=list)
    died: list[int] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return bool(self.late or self.died)


class WorkerPool:
    """Reusable worker processes that run ``function(*job)``; use as a context manager.

    ``function`` (and ``initializer``, run once in every new worker with ``initargs``) is a module-level function
    or a (module, name) pair: workers look it up by name for every job, so a worker forked after the module's
    attribute was replaced runs the replacement. ``workers`` defaults to the available cores. Workers start on
    first use and are kept until :meth:`close`, so repeated runs pay the start-up cost once; ``name`` is their
    process name.
    """

    def __init__(self, function: Callable | tuple[str, str], workers: int | None = None, *,
                 start_method: str | None = None, name: str = "worker",
                 initializer: Callable | tuple[str, str] | None = None, initargs: tuple = ()) -> None:
        self.workers = max(1, workers or available_cores())
        self._target = _name_of(function)
        self._initializer = _name_of(initializer) if initializer is not None else None
        self._initargs = tuple(initargs)
        self._name = name
        self._ctx = mp.get_context(start_method or default_start_method())
        self._workers: list[_Worker] = []

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the workers (they are idle between runs, so killing them loses nothing)."""
        workers, self._workers = self._workers, []
        for worker in workers:
            worker.kill()

    def _idle_worker(self) -> _Worker | None:
        for worker in self._workers:
            if worker.job is None:
                return worker
        if len(self._workers) < self.workers:
            self._workers.append(_Worker(self._ctx, self._name, self._target, self._initializer, self._initargs))
            return self._workers[-1]
        return None

    def _replace(self, worker: _Worker) -> None:
        worker.kill()
        self._workers.remove(worker)

    def run(self, n_jobs: int, make_job: Callable[[int], tuple], on_done: Callable[[int, Any], None], *,
            timeout_s: float, fail_fast: bool = False) -> Outcome:
        """Run jobs 0..n_jobs-1; ``make_job(i)`` builds job i's arguments when a worker is free for it (so jobs are
        never all in memory at once), ``on_done(i, result)`` receives each result in the order they arrive.

        A result that has not arrived ``timeout_s`` after its job was handed out is reported as late, a job whose
        worker died as died; with ``fail_fast`` the run stops at the first of either. An exception of the function
        is re-raised here after every worker is stopped.
        """
        outcome = Outcome()
        pending = deque(range(n_jobs))
        try:
            while not (fail_fast and outcome.failed):
                while pending and (worker := self._idle_worker()) is not None:
                    i = pending.popleft()
                    worker.send(make_job(i))
                    worker.job = (i, time.monotonic() + timeout_s)  # the deadline starts when the worker has it
                busy = [w for w in self._workers if w.job is not None]
                if not busy:
                    break
                nearest = min(w.job[1] for w in busy)
                ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                             timeout=max(0.0, nearest - time.monotonic()))
                now = time.monotonic()
                for worker in busy:
                    i, deadline = worker.job
                    if worker.conn in ready or worker.conn.poll():
                        try:
                            reply = worker.conn.recv()
                        except (EOFError, OSError):  # died while sending
                            outcome.died.append(i)
                            self._replace(worker)
                            continue
                        worker.job = None
                        if reply[0] == "error":
                            raise reply[1] from WorkerError(reply[2])
                        if now <= deadline:
                            on_done(i, reply[1])
                        else:
                            outcome.late.append(i)
                    elif worker.process.sentinel in ready:
                        outcome.died.append(i)
                        self._replace(worker)
                    elif deadline <= now:
                        outcome.late.append(i)
                        self._replace(worker)  # the only way to free a stuck worker
        except BaseException:
            self.close()
            raise
        if fail_fast and outcome.failed:
            self.close()  # the jobs still running are abandoned with their workers
        return outcome

