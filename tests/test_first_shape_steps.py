"""`scripts/first_shape_steps.py`: a shape's first step told apart from its later ones."""

from __future__ import annotations

import math

from patchedserve.scheduler import LatencyPredictor, StepSample
from script_module import load_script


def flat_cost() -> LatencyPredictor:
    """Predicts 0.1 s for every step: fitted on steps of 0.1 s."""
    mixes = [((64, 64, True),), ((128, 64, False), (64, 64, True)), ((128, 128, True),) * 3]
    cost = LatencyPredictor.fit([StepSample(m, 0.1) for m in mixes], patch_size=64)
    assert all(math.isclose(cost.predict_step(m), 0.1, rel_tol=1e-6) for m in mixes)
    return cost


def test_first_steps_of_each_shape_are_split_from_later_ones() -> None:
    script = load_script("first_shape_steps")
    a, b = [[64, 64, True]], [[128, 64, False], [64, 64, True]]  # 2 and 4 patches of 64 px
    c = [[64, 64, True], [64, 64, True]]  # a new set of requests, but 4 patches like b
    steps = [[0.0, 0.3, a], [0.1, 0.1, a], [0.2, 0.3, b], [0.3, 0.1, b], [0.4, 0.1, c]]
    patched = script.split(steps, "patched", flat_cost())
    assert (patched["first"], patched["later"]) == (2, 3)  # c repeats b's patch count
    assert math.isclose(patched["first_ratio"], 3.0, rel_tol=1e-6)
    assert math.isclose(patched["later_ratio"], 1.0, rel_tol=1e-6)
    assert math.isclose(patched["first_share"], 0.6 / 0.9, rel_tol=1e-6)
    image = script.split(steps, "image", flat_cost())
    assert (image["first"], image["later"]) == (3, 2)  # c is a new set of requests
