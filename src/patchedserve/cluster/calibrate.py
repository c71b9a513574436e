"""Image-level step cost: measured on this machine through the engine's own ``ImageBatch``.

The latency profile (``patchedserve profile``) times the patched model. The image-level systems
(image-fcfs, res-batch, nirvana) run the model's own forward once per resolution group, which
costs differently, so the simulator needs their cost too. ``calibrate_image`` times real
``ImageBatch`` steps (prepared requests, sampler included) for groups of 1..12 requests of one
size, and fits the same ``LatencyPredictor`` form on them: an image-level step then costs the sum
over its resolution groups of the predictor's step latency of that group (``cluster.costs``).
Features are counted in patches of the profile's patch size, so a 512x512 group of B requests
with CFG looks like 2B entries of 4 patches; the fitted coefficients differ from the patched ones.

Stored as a profile JSON with ``meta.execution = "image"``. Run by ``bench slo`` (next to its
results) and by ``bench calibrate-image``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from patchedserve.engine.image_batch import ImageBatch
from patchedserve.engine.prepare import Preparer
from patchedserve.models import ModelBundle, validate_generation
from patchedserve.request import Request
from patchedserve.scheduler import LatencyPredictor, Overhead, StepSample


@dataclass(frozen=True)
class ImageCalibration:
    """What ``calibrate_image`` measures."""

    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 256), (512, 512))
    """(width, height) in pixels of the groups."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 12)
    """Requests per group (the res-batch cap is 12)."""
    guidance_scale: float = 5.0
    """CFG scale of the requests (> 1: both branches, as the traces use)."""
    sampler: str = "euler"
    """Sampler of the requests."""
    repeats: int = 3
    """Timed steps per group after one warm-up step; the median is kept."""
    patch_size: int = 256
    """Patch side the features are counted in (the profile's)."""


def _requests(
    bundle: ModelBundle, size: tuple[int, int], count: int, config: ImageCalibration
) -> list[Request]:
    steps = config.repeats + 1
    params = validate_generation(bundle, size[0], size[1], steps, config.guidance_scale, config.sampler, 0)
    lp = config.patch_size
    return [
        Request(
            request_id=i,
            prompt=f"calibration prompt {i}",
            negative_prompt="",
            params=params,
            arrival_s=0.0,
            num_patches=-(-size[0] // lp) * -(-size[1] // lp),
        )
        for i in range(count)
    ]


def time_group(bundle: ModelBundle, preparer: Preparer, requests: list[Request]) -> list[float]:
    """Seconds of each step of ``requests`` run together as one image-level batch (first: warm-up)."""
    batch = ImageBatch(bundle, preparer.samplers, bundle.device)
    preparer.prepare(requests)
    batch.sync(requests)
    times = []
    for _ in range(requests[0].params.steps):
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)
        start = time.perf_counter()
        batch.step()
        if bundle.device.type == "cuda":
            torch.cuda.synchronize(bundle.device)
        times.append(time.perf_counter() - start)
    return times


def calibrate_image(
    bundle: ModelBundle, config: ImageCalibration = ImageCalibration(), overhead: Overhead | None = None
) -> LatencyPredictor:
    """Times image-level steps of single-size groups and fits the step model on them."""
    start = time.perf_counter()
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    cfg = config.guidance_scale > 1.0
    samples = []
    for size in config.sizes:
        for count in config.batch_sizes:
            times = time_group(bundle, preparer, _requests(bundle, size, count, config))
            entries = tuple((size[0], size[1], cfg) for _ in range(count))
            samples.append(StepSample(entries, statistics.median(times[1:])))
    meta = {
        "execution": "image",
        "model": bundle.name,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "calibration": {**asdict(config), "sizes": [list(s) for s in config.sizes]},
        "wall_s": time.perf_counter() - start,
    }
    predictor = LatencyPredictor.fit(samples, config.patch_size, overhead=overhead, meta=meta)
    errors = [abs(predictor.predict_step(s.entries) / s.latency_s - 1.0) for s in samples]
    predictor.meta["fit_mape_pct"] = 100.0 * sum(errors) / len(errors)
    predictor.meta["samples"] = [
        {"entries": [list(e) for e in s.entries], "latency_s": s.latency_s} for s in samples
    ]
    return predictor
