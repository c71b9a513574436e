"""The simulator's cost model: how long one engine iteration takes in virtual time.

An iteration of ``Engine.step`` costs, in this order: prompt encoding of the requests admitted in
it (``encode_s`` each, from the profile), then one denoising step of the active set:

* patched systems: the profile's predicted step latency of the whole active set
  (``LatencyPredictor.model_s``, no online correction: the simulated machine is the profiled one);
* image-level systems: the sum over resolution groups (and samplers, as ``ImageBatch`` groups) of
  the image-level predictor's latency of that group (``cluster.calibrate``).

A finished request is decoded on the engine's single decode worker (FIFO, overlapping the
denoising loop, as ``decode_in_thread`` does): ``decode_s(width, height)`` from the profile.
``scale`` multiplies every figure (a machine that is uniformly slower or faster than profiled).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from patchedserve.request import Request
from patchedserve.scheduler import LatencyPredictor, entry_of


def model_step_s(predictor: LatencyPredictor, requests: Sequence[Request]) -> float:
    """The fitted model's step latency of ``requests`` together (uncorrected; 0 for none)."""
    if not requests:
        return 0.0
    return predictor.model_s(predictor.mix([entry_of(r) for r in requests]).vector())


@dataclass(frozen=True)
class CostModel:
    """Virtual-time costs of one system on one machine; see the module docstring."""

    step_predictor: LatencyPredictor
    """Step latency model: the patched profile, or the image-level calibration."""
    image_level: bool
    """Price a step per resolution group (image-level execution) instead of as one patched call."""
    overhead_predictor: LatencyPredictor
    """Source of encode and decode costs (the patched profile: same text encoders and VAE)."""
    scale: float = 1.0
    """Multiplies every cost."""

    def step_s(self, running: Sequence[Request]) -> float:
        """One denoising step of the active set."""
        if not self.image_level:
            return self.scale * model_step_s(self.step_predictor, running)
        groups: dict[tuple[int, int, str], list[Request]] = {}
        for r in running:
            groups.setdefault((r.params.width, r.params.height, r.params.sampler), []).append(r)
        return self.scale * sum(model_step_s(self.step_predictor, g) for g in groups.values())

    def encode_s(self, count: int) -> float:
        """Prompt encoding of ``count`` admitted requests (both branches each)."""
        return self.scale * count * self.overhead_predictor.overhead.encode_s

    def decode_s(self, width: int, height: int) -> float:
        """VAE decode of one image."""
        return self.scale * self.overhead_predictor.overhead.decode_s(width, height)


def cost_model(
    execution: str, profile: LatencyPredictor, image_profile: LatencyPredictor | None, scale: float = 1.0
) -> CostModel:
    """The cost model of a system with ``execution`` (``patched`` or ``image``)."""
    if execution == "image":
        if image_profile is None:
            raise ValueError(
                "image-level systems need an image-level cost profile: pass --image-profile "
                "(written by `patchedserve bench slo` or `patchedserve bench calibrate-image`)"
            )
        return CostModel(image_profile, True, profile, scale)
    return CostModel(profile, False, profile, scale)
