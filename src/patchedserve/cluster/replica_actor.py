"""``EngineReplica``: one ``Engine`` in its own process, as a Ray actor of ``RayEngineGroup``.

The class is plain Python (``ray.remote`` is applied by the group), so it runs and tests without
Ray too. It builds its engine on the machine Ray placed it on (the device is checked there),
starts the engine's loop and answers the group's calls: queue requests (``submit_many``), await one
result (``result``), cancel, report its predicted outstanding work for dispatch (``load``), and
hand over the steps it ran and its cache counts since the last call (``report``); and, for a
benchmark replay, warm up (``warm_up``) and log its steps (``log_steps``, ``logged_steps``).
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from patchedserve.cluster.dispatch import remaining_work_s
from patchedserve.engine import Engine, EngineConfig, GenerationResult
from patchedserve.engine.served import CacheUsage, ServedModel
from patchedserve.models import load_model
from patchedserve.request import GenerationRequest, Request

StepRecord = tuple[float, int, int, int]
"""One denoising step as ``EngineObserver.on_step`` gets it: latency_s, patches, running, waiting."""


@dataclass(frozen=True)
class ReplicaInfo:
    """Where a replica runs and what it serves; the group reads it once, at start."""

    served: ServedModel
    node: str
    """Host name of the machine."""
    device: str
    """Torch device of its denoiser there."""
    threads: int
    """Torch threads of its engine loop."""


@dataclass(frozen=True)
class ReplicaReport:
    """What a replica did since the group last asked, and what it holds now."""

    num_waiting: int
    num_running: int
    steps: list[StepRecord] = field(default_factory=list)
    cache: CacheUsage = field(default_factory=CacheUsage)


def outstanding_work(engine: Engine) -> float:
    """Work of the requests ``engine`` holds, just submitted, queued or denoising: predicted
    seconds alone (``cluster.dispatch.remaining_work_s``) under a latency predictor, else
    patch-steps (each request's patches x its steps left), which ranks replicas of one config the
    same way. The just-submitted count at once, not at the loop's next step boundary: a burst that
    arrives during a step sees each of its requests already placed."""
    scheduler = engine.scheduler
    held: list[Request] = [*engine.submitted(), *scheduler.waiting, *scheduler.running]  # type: ignore[attr-defined]
    predictor = getattr(scheduler, "predictor", None)
    if predictor is not None:
        return sum(remaining_work_s(r, predictor) for r in held)
    return float(sum(r.num_patches * r.num_entries * r.steps_left for r in held))


class EngineReplica:
    """One engine replica; its methods are what the group calls remotely."""

    def __init__(self, model: str, options: dict[str, Any], threads: int | None = None) -> None:
        if threads is not None:
            torch.set_num_threads(threads)  # before the engine reads the count for its threads
        self.engine = Engine(load_model(model), EngineConfig(**options))
        self.engine.observers.append(self)
        self._futures: dict[int, Future[GenerationResult]] = {}
        self._steps: deque[StepRecord] = deque()
        """Steps the loop thread ran since the last ``report`` (a deque: appends and pops race)."""
        self._log: Any = None
        """A benchmark's ``bench.replay.StepLog`` once ``log_steps`` is called."""
        self.engine.start()

    # -- EngineObserver: the loop's steps are kept for the next ``report``
    def on_step(self, latency_s: float, num_patches: int, num_running: int, num_waiting: int) -> None:
        self._steps.append((latency_s, num_patches, num_running, num_waiting))

    def on_result(self, result: GenerationResult) -> None:
        pass  # results reach the group through ``result``

    # -- called by the group
    def info(self) -> ReplicaInfo:
        return ReplicaInfo(
            self.engine.served_model, socket.gethostname(), str(self.engine.device), torch.get_num_threads()
        )

    def submit_many(self, gens: Sequence[GenerationRequest]) -> tuple[list[int], float]:
        """Queue all or none (``Engine.submit_many``'s errors): the engine's request ids, and the
        load with them (so the group places the next image without asking every replica again)."""
        ids = []
        for f in self.engine.submit_many(gens):
            request_id: int = f.request_id  # type: ignore[attr-defined]
            self._futures[request_id] = f
            ids.append(request_id)
        return ids, self.load()

    async def result(self, request_id: int) -> GenerationResult:
        """Waits for the request's final result."""
        try:
            return await asyncio.wrap_future(self._futures[request_id])
        finally:
            self._futures.pop(request_id, None)

    def cancel(self, request_id: int) -> None:
        self.engine.cancel(request_id)

    def load(self) -> float:
        return outstanding_work(self.engine)

    def report(self) -> ReplicaReport:
        steps = [self._steps.popleft() for _ in range(len(self._steps))]
        engine = self.engine
        return ReplicaReport(engine.num_waiting, engine.num_running, steps, engine.patch_cache_usage())

    def log_steps(self, start_wall_s: float) -> None:
        """Log every step from now on for a benchmark replay (``bench.replay.StepLog``), times from
        ``start_wall_s``, a ``time.time()`` instant: the engine's clock is this machine's monotonic
        one, so the start is moved onto it (on another machine than the caller's, the two wall
        clocks agree as far as their time sync does)."""
        from patchedserve.bench.replay import StepLog

        if self._log is None:
            self._log = StepLog(self.engine)
        self._log.restart(start_wall_s - wall_minus_monotonic_s())

    def logged_steps(self) -> tuple[list[Any], list[Any]]:
        """What ``log_steps`` logged: the step records and each step's (request id, step index)."""
        if self._log is None:
            return [], []
        return list(self._log.records), list(self._log.progress)

    def warm_up(self, gens: Sequence[GenerationRequest]) -> None:
        """Runs ``gens`` and starts the predictor afresh (``bench.replay.warm_up``)."""
        from patchedserve.bench.replay import warm_up

        warm_up(self.engine, gens)

    def start(self) -> None:
        self.engine.start()

    def stop(self) -> None:
        self.engine.stop()


def wall_minus_monotonic_s() -> float:
    """``time.time() - time.monotonic()`` on this machine: adds to a monotonic instant to make it a
    wall-clock one (how a step log's start crosses to a replica on another machine)."""
    return time.time() - time.monotonic()
