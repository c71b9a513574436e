"""Data-parallel front: each new request goes to the replica with the least predicted outstanding work.

A replica's outstanding work is what its requests still need if each ran alone, from the shared
latency profile (no online correction): for every queued or running request, its remaining steps
x its solo step latency, plus prompt encoding if it has not started and its VAE decode. Batching
makes the real time shorter, but the sum ranks replicas by how much they have to do, which is
what "least loaded" needs; it is the same figure for every system, image-level or patched.
Ties go to the lowest index. Used by the simulator (``cluster.simulator``) for ``--replicas N``.

Each arrival weighs every replica, and an overloaded replica holds hundreds of queued requests, so
a replica keeps its queued requests' work priced once (a queued request's work does not change
until it starts) and sums it per call; only the running requests are priced afresh.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Protocol

from patchedserve.request import Request
from patchedserve.scheduler import LatencyPredictor, entry_of

WorkOf = Callable[[Request], float]
"""Request -> seconds it still needs alone (``remaining_work_s`` with the dispatcher's profile)."""


class LoadView(Protocol):
    """What the dispatcher reads of a replica: the work of the requests it holds, not yet finished."""

    def outstanding_work_s(self, work_of: WorkOf) -> float:
        """Sum of ``work_of`` over the replica's queued and running requests."""
        ...


def remaining_work_s(request: Request, predictor: LatencyPredictor) -> float:
    """Seconds ``request`` still needs alone: its remaining steps, encode if not started, decode."""
    width, height, cfg = entry_of(request)
    work_s = request.steps_left * predictor.solo_step_s((width, height, cfg), corrected=False)
    if request.step_index == 0:
        work_s += predictor.overhead.encode_s
    return work_s + predictor.overhead.decode_s(width, height)


class LeastLoadDispatcher:
    """Chooses, per arrival, the replica with the least predicted outstanding work."""

    def __init__(self, predictor: LatencyPredictor) -> None:
        self.predictor = predictor
        self.work_of: WorkOf = partial(remaining_work_s, predictor=predictor)
        self.assigned: list[int] = []
        """Replica index of every request dispatched so far, in order."""

    def load_s(self, replica: LoadView) -> float:
        return replica.outstanding_work_s(self.work_of)

    def choose(self, replicas: Sequence[LoadView]) -> int:
        """Index of the replica the next request goes to."""
        loads = [self.load_s(r) for r in replicas]
        index = min(range(len(loads)), key=lambda i: (loads[i], i))
        self.assigned.append(index)
        return index
