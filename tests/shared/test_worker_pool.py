"""The worker pool under the CRF and PriMaPs pools: every result reaches the caller once, the initializer runs in
every worker, fail_fast stops at the first dead or late job, and no worker outlives the pool.
(tests/shared/test_crf.py covers stuck, dying and never-reading workers and exceptions through CRFPool.)"""

import multiprocessing as mp
import os
import signal
import time

import pytest

from shared.worker_pool import WorkerPool

_OFFSET = 0


def _set_offset(value: int) -> None:
    global _OFFSET
    _OFFSET = value


def _square_plus_offset(x: int) -> tuple[int, int]:
    return x * x + _OFFSET, os.getpid()


def _die_on_one(x: int) -> int:
    if x == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    return x


def _sleep_on_one(x: int) -> int:
    if x == 1:
        time.sleep(600)
    return x


def _pool_workers_alive(name: str) -> list:
    return [p for p in mp.active_children() if p.name == name]


def test_every_result_arrives_once_and_the_initializer_runs_in_every_worker():
    got = {}
    with WorkerPool(_square_plus_offset, 2, name="test-worker", initializer=_set_offset, initargs=(1000,)) as pool:
        outcome = pool.run(9, lambda i: (i,), lambda i, r: got.setdefault(i, []).append(r), timeout_s=60.0)
        assert not outcome.failed
        assert sorted(got) == list(range(9)) and all(len(v) == 1 for v in got.values())
        assert [got[i][0][0] for i in range(9)] == [i * i + 1000 for i in range(9)]  # initializer ran everywhere
        assert {r[0][1] for r in got.values()} <= {w.process.pid for w in pool._workers} and len(pool._workers) == 2
        assert _OFFSET == 0  # ... in the workers, not here
    assert _pool_workers_alive("test-worker") == []


# A dying job needs no short deadline; a stuck one gets 3 s, which job 0 (instant) meets even on a loaded machine.
@pytest.mark.parametrize(("function", "field", "timeout_s"),
                         [(_die_on_one, "died", 60.0), (_sleep_on_one, "late", 3.0)])
def test_fail_fast_stops_at_the_first_failed_job(function, field, timeout_s):
    made, done = [], []

    def make_job(i):
        made.append(i)
        return (i,)

    with WorkerPool(function, 1, name="test-worker") as pool:
        outcome = pool.run(6, make_job, lambda i, r: done.append(r), timeout_s=timeout_s, fail_fast=True)
        assert getattr(outcome, field) == [1] and done == [0] and made == [0, 1]  # jobs 2..5 never built
        assert pool._workers == []
    assert _pool_workers_alive("test-worker") == []


def test_without_fail_fast_a_dead_job_costs_only_itself():
    done = {}
    with WorkerPool(_die_on_one, 2, name="test-worker") as pool:
        outcome = pool.run(5, lambda i: (i,), done.__setitem__, timeout_s=60.0)
    assert outcome.died == [1] and outcome.late == [] and done == {0: 0, 2: 2, 3: 3, 4: 4}


def test_a_function_that_workers_cannot_look_up_is_refused():
    with pytest.raises(ValueError, match="module-level function"):
        WorkerPool(lambda x: x, 2)
