"""The decode worker: one thread that turns finished latents into images, in the policy's order.

The engine hands each request that finished denoising to this worker with a priority from its
scheduling policy (``Scheduler.decode_priority``): lower values go first, equal values in the
order they came. FCFS policies give every request the same value, so decodes run first come,
first served; the ``slo`` policy gives the earliest deadline that can still be met.

Each job may carry a tag (the engine's: its request). ``ahead`` lists the tags of the jobs a new
job of a given priority would wait for, and how long the one running has run, so that the policy
can tell whether a request would still make its deadline on the worker (``decode_inline``).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

import torch

T = TypeVar("T")

log = logging.getLogger(__name__)


class DecodeWorker(Generic[T]):
    """A single worker thread with a priority queue of jobs, each with an optional tag."""

    def __init__(
        self, threads: int, name: str = "decode", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._threads = threads
        self._clock = clock
        self._jobs: list[tuple[float, int, Callable[[], None], T | None]] = []
        self._running: tuple[float, T | None] | None = None
        """(start time, tag) of the job the thread runs now."""
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: float, job: Callable[[], None], tag: T | None = None) -> None:
        """Queue ``job``; it runs after every queued job of a lower or equal priority value."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the decode worker is shut down")
            heapq.heappush(self._jobs, (priority, next(self._order), job, tag))
            self._cond.notify()

    def ahead(self, priority: float) -> list[tuple[T, float]]:
        """What a job of ``priority`` submitted now would wait for: the tagged job running (with
        the seconds it has run) and the tagged queued jobs that go before it (0 s each)."""
        with self._cond:
            waits = [(tag, 0.0) for p, _, _, tag in self._jobs if p <= priority and tag is not None]
            if self._running is not None:
                start_s, running = self._running
                if running is not None:
                    waits.append((running, max(self._clock() - start_s, 0.0)))
            return waits

    @property
    def closed(self) -> bool:
        """True once ``shutdown`` was called: the worker takes no more jobs."""
        return self._closing

    def pending(self) -> int:
        """Jobs queued and not started yet."""
        with self._cond:
            return len(self._jobs)

    def shutdown(self) -> None:
        """Run every queued job, then stop the thread (idempotent)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _run(self) -> None:
        # A new thread takes the torch thread count last set anywhere in the process.
        torch.set_num_threads(self._threads)
        while True:
            with self._cond:
                while not self._jobs and not self._closing:
                    self._cond.wait()
                if not self._jobs:
                    return
                _, _, job, tag = heapq.heappop(self._jobs)
                self._running = (self._clock(), tag)
            try:
                job()
            except Exception:  # a failing job must not take the thread, and every later job, with it
                log.exception("decode job failed")
            finally:
                with self._cond:
                    self._running = None
