"""Deadlines and the per-request predictions every policy shares.

``assign_deadline`` is called by ``QueueScheduler.add_request`` for both policies (FCFS needs
deadlines too, for SLO accounting in benchmarks). A request's deadline is ``arrival + slo_ms``
when it gives one, else ``arrival + slo_scale x`` its standalone latency from the profile (no
online correction: a slow or busy machine must not stretch its own objectives).
"""

from __future__ import annotations

from patchedserve.request import Request
from patchedserve.scheduler.features import Entry
from patchedserve.scheduler.predictor import LatencyPredictor


def entry_of(request: Request) -> Entry:
    """The predictor's view of a request: (width px, height px, CFG on)."""
    return request.params.width, request.params.height, request.params.do_cfg


def standalone_s(request: Request, predictor: LatencyPredictor, corrected: bool = False) -> float:
    """Latency of the whole request alone on this machine: encode, all steps, decode."""
    width, height, cfg = entry_of(request)
    return predictor.predict_standalone(width, height, request.params.steps, cfg, corrected=corrected)


def assign_deadline(request: Request, predictor: LatencyPredictor | None, slo_scale: float) -> None:
    """Sets ``request.deadline_s`` unless it is already set; leaves None without slo_ms or predictor."""
    if request.deadline_s is not None:
        return
    if request.slo_ms is not None:
        request.deadline_s = request.arrival_s + request.slo_ms / 1000.0
    elif predictor is not None:
        request.deadline_s = request.arrival_s + slo_scale * standalone_s(request, predictor)
