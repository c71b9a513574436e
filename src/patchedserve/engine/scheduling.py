"""Builds the engine's scheduling policy (``fcfs``, ``slo`` or ``res-fcfs``) and its latency predictor."""

from __future__ import annotations

from typing import TYPE_CHECKING

from patchedserve.engine.config import EngineConfig
from patchedserve.errors import InvalidRequestError
from patchedserve.scheduler import LatencyPredictor, QueueScheduler, make_scheduler
from patchedserve.scheduler.resbatch import ResolutionBatchScheduler

if TYPE_CHECKING:  # the simulator builds policies without the model code
    from patchedserve.models import ModelBundle
    from patchedserve.patch import PatchedModel


def build_predictor(
    config: EngineConfig, bundle: ModelBundle, model: PatchedModel
) -> LatencyPredictor | None:
    """The profile's predictor; a quick start-up profile for ``slo`` without one; else None."""
    if config.profile is not None:
        predictor = LatencyPredictor.load(config.profile)
        if predictor.patch_size != model.patch_size:
            raise InvalidRequestError(
                f"profile {config.profile} was measured with patch size {predictor.patch_size} px but the "
                f"engine uses {model.patch_size} px; profile again with --patch-size {model.patch_size}",
                field="profile",
            )
        return predictor
    if config.policy == "slo":
        from patchedserve.scheduler.profile import profile_quick

        return profile_quick(bundle, model)
    return None


def build_scheduler(config: EngineConfig, bundle: ModelBundle, model: PatchedModel) -> QueueScheduler:
    return build_policy(config, build_predictor(config, bundle, model))


def build_policy(config: EngineConfig, predictor: LatencyPredictor | None) -> QueueScheduler:
    """The scheduling policy ``config`` names, on ``predictor`` (the simulator builds its own so)."""
    policy_config = config.scheduler_config()
    if config.policy == ResolutionBatchScheduler.policy:
        return ResolutionBatchScheduler(config.max_running, predictor, policy_config)
    return make_scheduler(config.policy, predictor, policy_config)
