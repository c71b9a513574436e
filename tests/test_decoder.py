"""The decode worker runs jobs in the policy's priority order, and finishes what is queued."""

from __future__ import annotations

import threading

import pytest

from patchedserve.engine.decoder import DecodeWorker


def test_jobs_run_lowest_priority_value_first_and_ties_in_submission_order() -> None:
    worker = DecodeWorker(threads=1)
    started, gate, ran = threading.Event(), threading.Event(), []

    def hold() -> None:  # holds the worker while the rest queue
        started.set()
        gate.wait()

    try:
        worker.submit(0.0, hold)
        assert started.wait(10.0)
        for name, priority in [("c", 3.0), ("a1", 1.0), ("b", 2.0), ("a2", 1.0), ("late", float("inf"))]:
            worker.submit(priority, lambda name=name: ran.append(name))
        assert worker.pending() == 5
    finally:  # never leave the thread held
        gate.set()
        worker.shutdown()
    assert ran == ["a1", "a2", "b", "c", "late"]


def test_shutdown_runs_what_is_queued_then_refuses_more() -> None:
    worker = DecodeWorker(threads=1)
    ran: list[int] = []
    for i in range(3):
        worker.submit(0.0, lambda i=i: ran.append(i))
    worker.shutdown()
    assert ran == [0, 1, 2]
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(0.0, lambda: None)
    worker.shutdown()  # idempotent


def test_ahead_lists_the_running_job_and_the_queued_ones_that_go_first() -> None:
    now = {"s": 10.0}
    worker: DecodeWorker[str] = DecodeWorker(threads=1, clock=lambda: now["s"])
    started, gate = threading.Event(), threading.Event()

    def hold() -> None:
        started.set()
        gate.wait()

    try:
        assert worker.ahead(1.0) == []  # idle
        worker.submit(5.0, hold, "running")
        assert started.wait(10.0)
        worker.submit(1.0, lambda: None, "urgent")
        worker.submit(3.0, lambda: None, "later")
        worker.submit(0.0, lambda: None)  # untagged: not reported
        now["s"] = 10.25
        assert sorted(worker.ahead(1.0)) == [("running", 0.25), ("urgent", 0.0)]  # ties go first too
        assert sorted(worker.ahead(4.0)) == [("later", 0.0), ("running", 0.25), ("urgent", 0.0)]
        assert worker.ahead(0.5) == [("running", 0.25)]
    finally:
        gate.set()
        worker.shutdown()
    assert worker.ahead(10.0) == []  # all done


def test_a_job_that_raises_does_not_stop_the_worker() -> None:
    worker = DecodeWorker(threads=1)
    ran: list[str] = []
    try:
        worker.submit(0.0, lambda: 1 / 0)
        worker.submit(1.0, lambda: ran.append("after"))
    finally:
        worker.shutdown()
    assert ran == ["after"] and worker.closed
