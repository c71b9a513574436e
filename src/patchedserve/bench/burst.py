"""``patchedserve bench burst``: engine throughput on a burst of mixed-resolution requests.

All requests arrive at once. The engine serves them with step-level patched batching; the
baseline is the reference pipeline (image-level, one request at a time), i.e. a plain diffusers
pipeline behind a queue. Both run in the same process on the same model; images per minute and
their ratio are reported.
"""

from __future__ import annotations

import time
from typing import Any

from patchedserve.engine import Engine, EngineConfig
from patchedserve.models import load_model
from patchedserve.reference import ReferencePipeline
from patchedserve.request import GenerationRequest, RequestStatus


def burst_requests(
    sizes: list[tuple[int, int]], count: int, steps: int, guidance: float
) -> list[GenerationRequest]:
    """``count`` requests cycling through ``sizes`` (height, width), distinct prompts and seeds."""
    return [
        GenerationRequest(
            f"burst prompt {i}",
            width=sizes[i % len(sizes)][1],
            height=sizes[i % len(sizes)][0],
            steps=steps,
            guidance_scale=guidance,
            seed=i,
        )
        for i in range(count)
    ]


def run_burst_bench(
    model: str,
    sizes: list[tuple[int, int]],
    count: int,
    steps: int,
    guidance: float,
    patch_size: int,
    max_running: int,
) -> dict[str, Any]:
    bundle = load_model(model)
    requests = burst_requests(sizes, count, steps, guidance)
    reference = ReferencePipeline(bundle)
    reference.generate(prompt="warm-up", width=sizes[0][1], height=sizes[0][0], steps=1)
    start = time.perf_counter()
    for g in requests:
        reference.generate_request(g)
    reference_s = time.perf_counter() - start
    engine = Engine(bundle, EngineConfig(patch_size=patch_size, max_running=max_running))
    try:
        engine.generate(burst_requests(sizes[:1], 1, 1, guidance))  # warm-up
        start = time.perf_counter()
        results = engine.generate(requests)
        engine_s = time.perf_counter() - start
    finally:
        engine.stop()
    ok = sum(r.status == RequestStatus.FINISHED for r in results)
    return {
        "model": model,
        "count": count,
        "steps": steps,
        "guidance_scale": guidance,
        "patch_size": patch_size,
        "sizes": [f"{w}x{h}" for h, w in sizes],
        "max_running": max_running,
        "reference_s": reference_s,
        "engine_s": engine_s,
        "engine_finished": ok,
        "reference_images_per_min": 60 * count / reference_s,
        "engine_images_per_min": 60 * ok / engine_s,
        "speedup": reference_s / engine_s,
    }
