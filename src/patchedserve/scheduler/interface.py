"""The contract between the engine loop and a scheduling policy.

The engine calls, in order, per iteration: ``add_request`` for arrivals, ``schedule`` to get the
step's active set, runs the step, then ``update_from_output``. ``finish_requests`` removes
requests early (cancellation, failure). Policies (``fcfs``, ``slo``) implement this interface;
the simulator drives the very same objects on a virtual clock.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from patchedserve.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """What to run in the next step."""

    running: list[Request]
    """The requests that take this step: the active set (admitted earlier or now, in a stable
    order) without ``paused``."""
    admitted: list[Request] = field(default_factory=list)
    """Requests that join in this step (a subset of ``running``)."""
    dropped: list[Request] = field(default_factory=list)
    """Requests refused in this call; their status is DROPPED and ``error`` says why."""
    paused: list[Request] = field(default_factory=list)
    """Active requests that sit this step out (``SchedulerConfig.pause``): they stay in the active
    set, and the engine keeps their latents until they step again."""
    preempted: list[Request] = field(default_factory=list)
    """Requests moved from the active set back to the queue in this call (WAITING again; the engine
    keeps their latents for when they are admitted again). No policy preempts yet."""


@dataclass(frozen=True)
class StepOutcome:
    """What the engine observed for one executed step."""

    running: list[Request]
    """The requests that took part; each one's ``step_index`` has already advanced."""
    latency_s: float
    """Wall (or virtual) time of the step."""
    now_s: float
    """Clock after the step."""


class Scheduler(ABC):
    """A scheduling policy; see the module docstring for the call order."""

    @abstractmethod
    def add_request(self, request: Request, now_s: float) -> None:
        """Queue a new request.

        Args:
            request: a WAITING request; the policy may set its ``deadline_s``.
            now_s: the current clock.
        """

    @abstractmethod
    def schedule(self, now_s: float) -> SchedulerOutput:
        """Choose the next step's active set.

        Args:
            now_s: the current clock.
        Returns:
            The active set, what joined, and what was refused.
        """

    @abstractmethod
    def update_from_output(self, outcome: StepOutcome) -> list[Request]:
        """Account for an executed step.

        Args:
            outcome: the requests that ran and the observed latency.
        Returns:
            The requests that completed their last denoising step (removed from the active set).
        """

    @abstractmethod
    def finish_requests(self, request_ids: Iterable[int], status: RequestStatus) -> list[Request]:
        """Remove requests early, wherever they are (queue or active set).

        Args:
            request_ids: ids to remove; unknown ids are ignored.
            status: final status to set (CANCELLED or FAILED).
        Returns:
            The requests that were removed.
        """

    def decode_priority(self, request: Request, now_s: float) -> float:
        """Where a request that finished denoising at ``now_s`` queues for the decode worker:
        lower values first, equal values in finishing order. Every request gets 0 here, so
        decodes run first come, first served; a policy that knows deadlines may order them."""
        return 0.0

    def decode_inline(
        self, request: Request, now_s: float, ahead: Sequence[tuple[Request, float]] = ()
    ) -> bool:
        """Whether a request that finished denoising at ``now_s`` is decoded at once in the
        denoising loop (which waits for it) instead of queueing for the decode worker, where it
        would share the CPU with the steps and wait for ``ahead``: the decodes that would go
        before it, each with the seconds it has already run (0 while queued). Never here; a
        policy that knows deadlines may say so for a request whose deadline only a decode at
        full speed can still make."""
        return False

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...

    @property
    @abstractmethod
    def num_running(self) -> int: ...
