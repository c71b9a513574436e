"""From timed runs to a fitted step model and its held-out error, with drift correction.

On a shared machine a run's time is the mix's cost times the machine's speed at that moment, and
that speed drifts as other processes come and go. Measured on the 2-core development box (200
mixes x 3 interleaved rounds): the log-residuals of runs adjacent in time correlate 0.67, and
0.52 five runs apart, so most of the noise is slow. ``drift_scales`` estimates the speed at each
run as the median residual ratio of the runs around it in time (other mixes, training split
only), and the fit alternates between the model and those scales. That is the offline analogue
of the online correction the predictor applies at run time; the held-out mixes never inform the
scales or the model, and the report gives the error without the correction as well.

Called by ``profile.run_profile``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patchedserve.scheduler.features import Entry
from patchedserve.scheduler.predictor import LatencyPredictor, StepSample, mape


@dataclass(frozen=True)
class TimedRun:
    """One timed forward of one mix."""

    mix: int
    """Index of the mix."""
    seconds: float
    """Measured time."""


def drift_scales(
    runs: Sequence[TimedRun], predicted_s: Sequence[float], usable: set[int], window: int
) -> np.ndarray:  # [runs]
    """Machine speed factor at each run (runs in time order): the median of observed / predicted
    over the ``window`` nearest usable runs on each side that time other mixes."""
    log_ratio = np.array([math.log(r.seconds / predicted_s[r.mix]) for r in runs])  # [runs]
    mix_of = np.array([r.mix for r in runs])  # [runs]
    positions = np.flatnonzero(np.isin(mix_of, list(usable)))  # [usable runs]
    scales = np.ones(len(runs))
    for j in range(len(runs)):
        k = int(np.searchsorted(positions, j))
        near = positions[max(0, k - window) : k + window + 1]
        near = near[mix_of[near] != mix_of[j]]
        if len(near):
            scales[j] = math.exp(float(np.median(log_ratio[near])))
    return scales


def labels_of(runs: Sequence[TimedRun], num_mixes: int, scales: np.ndarray) -> list[float]:
    """Median over each mix's runs of seconds / scale."""
    per_mix: list[list[float]] = [[] for _ in range(num_mixes)]
    for run, scale in zip(runs, scales, strict=True):
        per_mix[run.mix].append(run.seconds / scale)
    return [statistics.median(values) for values in per_mix]


def fit_with_drift(
    mixes: Sequence[tuple[Entry, ...]],
    runs: Sequence[TimedRun],
    train: Sequence[int],
    patch_size: int,
    window: int,
    iterations: int = 3,
) -> tuple[LatencyPredictor, list[float], list[float]]:
    """Fits on the training mixes, correcting drift ``iterations`` times (``window=0``: never).

    Returns:
        The predictor, the drift-corrected label of every mix, and the raw label (median) of every mix.
    """
    raw = labels_of(runs, len(mixes), np.ones(len(runs)))
    labels = raw
    train_set = set(train)
    for iteration in range(iterations + 1 if window > 0 else 1):
        predictor = LatencyPredictor.fit([StepSample(mixes[i], labels[i]) for i in train], patch_size)
        if iteration == iterations or window <= 0:
            break
        predicted = [predictor.predict_step(mix) for mix in mixes]
        labels = labels_of(runs, len(mixes), drift_scales(runs, predicted, train_set, window))
    return predictor, labels, raw


def ape_percent(
    predictor: LatencyPredictor, mixes: Sequence[tuple[Entry, ...]], labels: Sequence[float]
) -> list[float]:
    """Absolute percentage error of each mix's prediction."""
    return [100.0 * abs(predictor.predict_step(m) / y - 1.0) for m, y in zip(mixes, labels, strict=True)]


def error_report(
    predictor: LatencyPredictor,
    mixes: Sequence[tuple[Entry, ...]],
    labels: Sequence[float],
    raw: Sequence[float],
    train: Sequence[int],
    test: Sequence[int],
) -> dict[str, float]:
    """Held-out and training error figures (percent)."""
    held = sorted(ape_percent(predictor, [mixes[i] for i in test], [labels[i] for i in test]))
    held_raw = ape_percent(predictor, [mixes[i] for i in test], [raw[i] for i in test])
    train_predictions = [predictor.predict_step(mixes[i]) for i in train]
    return {
        "heldout_mape": statistics.fmean(held),
        "heldout_p90_ape": held[min(len(held) - 1, int(0.9 * len(held)))],
        "heldout_max_ape": held[-1],
        "heldout_mape_raw": statistics.fmean(held_raw),
        "train_mape": mape(train_predictions, [labels[i] for i in train]),
    }
