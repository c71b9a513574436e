"""The decode worker: one thread that turns finished latents into images, in the policy's order.

The engine hands each request that finished denoising to this worker with a priority from its
scheduling policy (``Scheduler.decode_priority``): lower values go first, equal values in the
order they came. FCFS policies give every request the same value, so decodes run first come,
first served; the ``slo`` policy gives the earliest deadline that can still be met.
"""

from __future__ import annotations

import heapq
import itertools
import threading
from collections.abc import Callable

import torch


class DecodeWorker:
    """A single worker thread with a priority queue of jobs."""

    def __init__(self, threads: int, name: str = "decode") -> None:
        self._threads = threads
        self._jobs: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, priority: float, job: Callable[[], None]) -> None:
        """Queue ``job``; it runs after every queued job of a lower priority value."""
        with self._cond:
            if self._closing:
                raise RuntimeError("the decode worker is shut down")
            heapq.heappush(self._jobs, (priority, next(self._order), job))
            self._cond.notify()

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
                _, _, job = heapq.heappop(self._jobs)
            job()  # the engine's job catches its own errors
