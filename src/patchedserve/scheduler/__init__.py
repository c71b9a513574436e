"""Scheduling: which requests run in the next denoising step, and how long a step will take.

``make_scheduler`` builds a policy by name (``fcfs``, ``slo``); ``LatencyPredictor`` (from a
profile file, ``profile_quick`` or ``LatencyPredictor.fit``) prices candidate active sets.
"""

from dataclasses import replace

from patchedserve.errors import InvalidRequestError
from patchedserve.scheduler.base import QueueScheduler
from patchedserve.scheduler.config import ADMISSIONS, ON_INFEASIBLE, POLICIES, SchedulerConfig
from patchedserve.scheduler.deadline import assign_deadline, entry_of, standalone_s
from patchedserve.scheduler.fcfs import FCFSScheduler
from patchedserve.scheduler.features import FEATURE_NAMES, Entry, MixSums
from patchedserve.scheduler.interface import Scheduler, SchedulerOutput, StepOutcome
from patchedserve.scheduler.predictor import LatencyPredictor, OnlineConfig, Overhead, StepSample
from patchedserve.scheduler.slo import SLOScheduler

_CLASSES: dict[str, type[QueueScheduler]] = {"fcfs": FCFSScheduler, "slo": SLOScheduler}


def make_scheduler(
    policy: str, predictor: LatencyPredictor | None = None, config: SchedulerConfig | None = None
) -> QueueScheduler:
    """Builds the named policy.

    Args:
        policy: ``fcfs`` or ``slo``; wins over ``config.policy``.
        predictor: latency predictor; required by ``slo``, used by both for deadlines of requests
            without ``slo_ms`` and fed every executed step (online update).
        config: the other knobs (default ``SchedulerConfig()``).
    Raises:
        InvalidRequestError: unknown policy (``field="policy"``), or ``slo`` without a predictor.
    """
    if policy not in _CLASSES:
        raise InvalidRequestError(
            f"policy must be one of {', '.join(POLICIES)}; got {policy!r}", field="policy"
        )
    config = replace(config or SchedulerConfig(), policy=policy)
    if policy == "slo" and predictor is None:
        raise InvalidRequestError(
            "policy slo needs a latency predictor: load a profile or profile at start-up",
            field="policy",
        )
    return _CLASSES[policy](config.max_running, predictor, config)


__all__ = [
    "ADMISSIONS",
    "FEATURE_NAMES",
    "ON_INFEASIBLE",
    "POLICIES",
    "Entry",
    "FCFSScheduler",
    "LatencyPredictor",
    "MixSums",
    "OnlineConfig",
    "Overhead",
    "QueueScheduler",
    "SLOScheduler",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "StepOutcome",
    "StepSample",
    "assign_deadline",
    "entry_of",
    "make_scheduler",
    "standalone_s",
]
