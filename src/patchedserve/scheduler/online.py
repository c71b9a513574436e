"""How the latency predictor follows the machine at run time: one multiplicative correction factor.

``follow`` keeps an exponentially weighted average of log(observed / modelled) step latency. With
``alpha = 0.1`` it averages out per-step noise (about 10 steps' worth), but alone it would take
about 25 steps to follow a 2x change of machine speed, and longer in practice, because short steps
are slowed less by CPU contention than long ones. So a shift is detected: after ``shift_steps``
steps in a row off by more than ``shift_threshold`` in the same direction, the weight rises to
``fast_alpha`` until the error is back under the threshold (measured on the development machine
with ``scripts/predictor_drift.py``). Per-step ratios are clipped, so one hiccup (a page-fault
storm, a GC pause) moves the factor by at most ``alpha x log(clip_ratio)`` and never starts the
fast mode. Called by ``LatencyPredictor.observe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class OnlineConfig:
    """How the predictor follows the machine at run time."""

    alpha: float = 0.1
    """Weight of the newest step in the moving average of log(observed / model)."""
    clip_ratio: float = 3.0
    """Per-step ratios are clipped to [1/clip_ratio, clip_ratio] before averaging."""
    shift_threshold: float = 0.1
    """Relative error beyond which a step counts towards a shift of machine speed."""
    shift_steps: int = 3
    """Consecutive steps off in the same direction that make a shift."""
    fast_alpha: float = 0.5
    """Weight of the newest step while a shift is being followed."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0 or not 0.0 <= self.fast_alpha <= 1.0:
            raise ValueError(f"alpha and fast_alpha must be in [0, 1], got {self.alpha}, {self.fast_alpha}")
        if self.shift_threshold < 0.0 or self.shift_steps < 1:
            raise ValueError("shift_threshold must be >= 0 and shift_steps >= 1")
        if self.clip_ratio < 1.0:
            raise ValueError(f"clip_ratio must be >= 1, got {self.clip_ratio}")


def follow(log_correction: float, streak: int, log_ratio: float, config: OnlineConfig) -> tuple[float, int]:
    """One step of the update.

    Args:
        log_correction: the current log correction factor.
        streak: signed count of the preceding consecutive steps off by more than the threshold.
        log_ratio: log(observed / modelled) of the new step.
        config: the update's settings.
    Returns:
        The new log correction factor and streak.
    """
    bound = math.log(config.clip_ratio)
    residual = min(max(log_ratio, -bound), bound) - log_correction
    if abs(residual) <= math.log1p(config.shift_threshold):
        streak = 0
    elif streak * residual > 0:  # same direction as the steps before
        streak += 1 if residual > 0 else -1
    else:
        streak = 1 if residual > 0 else -1
    alpha = config.fast_alpha if abs(streak) >= config.shift_steps else config.alpha
    return log_correction + alpha * residual, streak
