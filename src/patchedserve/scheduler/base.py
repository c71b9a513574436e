"""Queue and active-set bookkeeping shared by every policy; policies only decide admission.

Owns the waiting queue (arrival order), the active set, completion at the last step and early
removal. Subclasses implement ``_admit``, which moves requests from ``waiting`` to ``running``.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler.interface import Scheduler, SchedulerOutput, StepOutcome


class QueueScheduler(Scheduler):
    def __init__(self, max_running: int) -> None:
        if max_running < 1:
            raise ValueError("max_running must be at least 1")
        self.max_running = max_running
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add_request(self, request: Request, now_s: float) -> None:
        request.status = RequestStatus.WAITING
        self.waiting.append(request)

    def schedule(self, now_s: float) -> SchedulerOutput:
        out = SchedulerOutput(running=self.running)
        self._admit(now_s, out)
        for r in out.admitted:
            r.status = RequestStatus.RUNNING
        for r in out.dropped:
            r.status = RequestStatus.DROPPED
        out.running = list(self.running)
        return out

    @abstractmethod
    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        """Move requests from ``self.waiting`` to ``self.running`` (recording them in ``out``)."""

    def update_from_output(self, outcome: StepOutcome) -> list[Request]:
        done = [r for r in outcome.running if r.steps_left <= 0 and r in self.running]
        if done:
            self.running = [r for r in self.running if r.steps_left > 0]
        return done

    def finish_requests(self, request_ids: Iterable[int], status: RequestStatus) -> list[Request]:
        ids = set(request_ids)
        removed = [r for r in (*self.waiting, *self.running) if r.request_id in ids]
        self.waiting = [r for r in self.waiting if r.request_id not in ids]
        self.running = [r for r in self.running if r.request_id not in ids]
        for r in removed:
            r.status = status
        return removed

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)
