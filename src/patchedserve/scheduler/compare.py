"""Alternatives to the predictor's model, measured on the same split (``patchedserve profile --compare``).

The evidence behind the choice in ``predictor``: held-out MAPE of

* ``nnls_relative``: the shipped model (non-negative, fit on relative error);
* ``nnls_absolute``: the same fit on absolute error (large mixes dominate it);
* ``mlp_paper``: the paper's MLP over requests per profiled resolution, distinct resolutions and
  total patches (it cannot price a resolution outside the profile's vocabulary);
* ``mlp_cost_terms``: an MLP over our cost-term features.

The MLPs use scikit-learn defaults plus standardised inputs and a log target, which is what makes
them competitive at all on a couple of hundred samples.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from patchedserve.scheduler.features import MixSums, patches_of
from patchedserve.scheduler.predictor import LatencyPredictor, StepSample, mape


def _cost_terms(samples: Sequence[StepSample], patch_size: int) -> np.ndarray:  # [S, F]
    return np.array([MixSums.of(s.entries, patch_size).vector() for s in samples])


def _paper_features(
    samples: Sequence[StepSample], vocabulary: list[tuple[int, int]], patch_size: int
) -> np.ndarray:  # [S, len(vocabulary) + 2]
    rows = []
    for s in samples:
        sums = MixSums.of(s.entries, patch_size)
        counts = [sums.requests_per_resolution.get(size, 0) for size in vocabulary]
        rows.append(
            [
                *counts,
                len(sums.requests_per_resolution),
                sum(patches_of(w, h, patch_size) for w, h, _ in s.entries),
            ]
        )
    return np.array(rows, dtype=float)


def _mlp_mape(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, y_test: np.ndarray, seed: int
) -> float:
    from sklearn.neural_network import MLPRegressor
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    model = make_pipeline(
        StandardScaler(), MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=5000, random_state=seed)
    )
    model.fit(x_train, np.log(y_train))
    return float(mape(list(np.exp(model.predict(x_test))), list(y_test)))


def compare_models(
    train: Sequence[StepSample], test: Sequence[StepSample], patch_size: int, seed: int = 0
) -> dict[str, float]:
    """Held-out MAPE (percent) of each alternative; see the module docstring."""
    y_train = np.array([s.latency_s for s in train])
    y_test = np.array([s.latency_s for s in test])
    observed = list(y_test)
    results: dict[str, float] = {}

    relative = LatencyPredictor.fit(train, patch_size)
    results["nnls_relative"] = float(mape([relative.predict_step(s.entries) for s in test], observed))

    from sklearn.linear_model import LinearRegression

    x_train, x_test = _cost_terms(train, patch_size), _cost_terms(test, patch_size)
    absolute = LinearRegression(positive=True, fit_intercept=False).fit(x_train, y_train)
    results["nnls_absolute"] = float(mape(list(absolute.predict(x_test)), observed))

    vocabulary = sorted({(w, h) for s in train for w, h, _ in s.entries})
    p_train = _paper_features(train, vocabulary, patch_size)
    p_test = _paper_features(test, vocabulary, patch_size)
    results["mlp_paper"] = _mlp_mape(p_train, y_train, p_test, y_test, seed)
    results["mlp_cost_terms"] = _mlp_mape(x_train, y_train, x_test, y_test, seed)
    return results
