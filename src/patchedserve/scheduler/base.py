"""Queue and active-set bookkeeping shared by every policy; policies only decide admission.

Owns the waiting queue (arrival order), the active set, deadlines (set at ``add_request``),
completion at the last step, early removal, and feeding each executed step to the latency
predictor's online update. Subclasses implement ``_admit``, which moves requests from
``waiting`` to ``running`` (and may drop or, later, preempt), and may override ``_step_set`` to
pause active requests for a step.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler.config import SchedulerConfig
from patchedserve.scheduler.deadline import assign_deadline, entry_of
from patchedserve.scheduler.interface import Scheduler, SchedulerOutput, StepOutcome
from patchedserve.scheduler.predictor import LatencyPredictor


class QueueScheduler(Scheduler):
    """Bookkeeping of a policy; see the module docstring.

    Args:
        max_running: cap on the active set (kept first for ``FCFSScheduler(n)``); must agree with
            ``config.max_running`` when both are given.
        predictor: step-latency predictor; needed for deadlines of requests without ``slo_ms``.
        config: the policy's knobs (default: ``SchedulerConfig`` with this ``max_running``).
    """

    policy: str = ""
    """Name ``make_scheduler`` knows this policy by."""

    def __init__(
        self,
        max_running: int | None = None,
        predictor: LatencyPredictor | None = None,
        config: SchedulerConfig | None = None,
    ) -> None:
        if config is None:
            config = SchedulerConfig(policy=self.policy or "fcfs", max_running=max_running or 12)
        if max_running is not None and max_running != config.max_running:
            raise ValueError(
                f"max_running {max_running} differs from config.max_running {config.max_running}"
            )
        self.config = config
        self.max_running = config.max_running
        self.predictor = predictor
        self.waiting: list[Request] = []
        self.running: list[Request] = []

    def add_request(self, request: Request, now_s: float) -> None:
        request.status = RequestStatus.WAITING
        assign_deadline(request, self.predictor, self.config.slo_scale)
        self.waiting.append(request)

    def schedule(self, now_s: float) -> SchedulerOutput:
        out = SchedulerOutput(running=self.running)
        self._admit(now_s, out)
        for r in out.admitted:
            r.status = RequestStatus.RUNNING
        for r in out.dropped:
            r.status = RequestStatus.DROPPED
        out.running = list(self.running)
        stepping = self._step_set(now_s, out)
        if len(stepping) < len(out.running):
            ids = {r.request_id for r in stepping}
            out.paused = [r for r in out.running if r.request_id not in ids]
            out.running = stepping
        return out

    def _step_set(self, now_s: float, out: SchedulerOutput) -> list[Request]:
        """The requests of ``out.running`` (the whole active set) that take the next step; all of
        them here. A policy may pause some (never all)."""
        return out.running

    @abstractmethod
    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        """Move requests from ``self.waiting`` to ``self.running`` (recording them in ``out``)."""

    def update_from_output(self, outcome: StepOutcome) -> list[Request]:
        if self.predictor is not None and self.config.observe_steps and outcome.running:
            self.predictor.observe([entry_of(r) for r in outcome.running], outcome.latency_s)
        done = [r for r in outcome.running if r.steps_left <= 0 and r in self.running]
        if done:
            self.running = [r for r in self.running if r.steps_left > 0]
        return done

    def finish_requests(self, request_ids: Iterable[int], status: RequestStatus) -> list[Request]:
        ids = set(request_ids)
        removed = [r for r in (*self.waiting, *self.running) if r.request_id in ids]
        if any(r.request_id in ids for r in self.waiting):  # keep the list (and views of it) otherwise
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
