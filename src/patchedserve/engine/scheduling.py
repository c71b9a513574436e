"""Builds the engine's scheduling policy from its config (``fcfs`` or ``slo``)."""

from __future__ import annotations

from patchedserve.engine.config import EngineConfig
from patchedserve.errors import InvalidRequestError
from patchedserve.models import ModelBundle
from patchedserve.patch import PatchedModel
from patchedserve.scheduler import FCFSScheduler, Scheduler

POLICIES = ("fcfs", "slo")


def build_scheduler(config: EngineConfig, bundle: ModelBundle, model: PatchedModel) -> Scheduler:
    if config.policy == "fcfs":
        return FCFSScheduler(config.max_running)
    raise InvalidRequestError(
        f"policy must be one of {', '.join(POLICIES)}; got {config.policy!r}", field="policy"
    )
