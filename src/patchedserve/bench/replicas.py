"""``patchedserve bench replicas``: a burst through N Ray engine replicas against one engine in-process.

The same burst of mixed-resolution requests (``bench.burst.burst_requests``) runs on:

- ``engine``: one ``Engine`` in this process, on all of this machine's torch threads (or its GPU);
- ``ray-N`` for each N of ``--replicas``: a ``RayEngineGroup`` of N replicas on this machine, the
  threads shared out (``cpus_per_replica`` = threads // N) or one GPU each, every request
  submitted on its own so that dispatch spreads them.

Systems take turns within each round, so drift in the machine's speed meets them all alike; the
report gives each system's median burst time, images per minute and ratio to ``engine``, the
median latency of one small request alone (what the front and Ray add to a request), and that of
one request for ``images`` images of the first size, submitted in one call as the server submits an
``n``-image request (a group of replicas spreads its images). Every group is
alive for the whole run, so the bench starts Ray with as many logical CPUs as the groups reserve
together (when it starts Ray itself); only one system runs at a time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

import ray
import torch

from patchedserve.bench.burst import burst_requests
from patchedserve.cluster.ray_group import RayEngineGroup, device_type
from patchedserve.engine import Engine, EngineConfig, GenerationResult
from patchedserve.models import load_model
from patchedserve.request import GenerationRequest

Submit = Callable[[Sequence[GenerationRequest]], list[Future[GenerationResult]]]


def timed_burst(submit: Submit, gens: list[GenerationRequest], together: bool = False) -> tuple[float, int]:
    """Seconds from the first submit to the last result, and how many finished. Each request is
    submitted on its own, or with ``together`` all in one call (as the server submits an
    ``n``-image request)."""
    start = time.perf_counter()
    futures = submit(gens) if together else [f for g in gens for f in submit([g])]
    results = [f.result(timeout=3600) for f in futures]
    return time.perf_counter() - start, sum(r.ok for r in results)


def run_replica_bench(
    model: str,
    sizes: list[tuple[int, int]],
    count: int,
    steps: int,
    patch_size: int,
    replicas: list[int],
    rounds: int,
    device: str = "cpu",
    images: int = 4,
) -> dict[str, Any]:
    threads = torch.get_num_threads()
    gpu = device_type(device) == "cuda"
    gens = burst_requests(sizes, count, steps, 5.0)
    small = burst_requests(sizes[:1], 1, 2, 5.0)
    (h, w), first = sizes[0], gens[0]
    one_request = [replace(first, seed=i) for i in range(images)]  # one n-image request
    options = {"patch_size": patch_size, "device": device}
    engine = Engine(load_model(model), EngineConfig(**options))  # type: ignore[arg-type]
    engine.start()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(num_cpus=threads * len(replicas), include_dashboard=False, configure_logging=False)
    systems: dict[str, Submit] = {"engine": engine.submit_many}
    groups: list[RayEngineGroup] = []
    try:
        for n in replicas:
            group = RayEngineGroup(model, options, n, cpus_per_replica=1 if gpu else max(1, threads // n))
            group.start()
            groups.append(group)
            systems[f"ray-{n}"] = group.submit_many
        for submit in systems.values():  # warm-up: first calls pay for lazy set-up
            timed_burst(submit, small)
        bursts: dict[str, list[float]] = {name: [] for name in systems}
        finished: dict[str, int] = dict.fromkeys(systems, count)
        singles: dict[str, list[float]] = {name: [] for name in systems}
        grouped: dict[str, list[float]] = {name: [] for name in systems}
        for _ in range(rounds):
            for name, submit in systems.items():
                seconds, ok = timed_burst(submit, gens)
                bursts[name].append(seconds)
                finished[name] = min(finished[name], ok)
                singles[name].append(timed_burst(submit, small)[0])
                if one_request:
                    seconds, ok = timed_burst(submit, one_request, together=True)
                    if ok < len(one_request):
                        raise RuntimeError(f"{name}: {len(one_request) - ok} grouped images did not finish")
                    grouped[name].append(seconds)
    finally:
        for group in groups:
            group.shutdown()
        if owns_ray:
            ray.shutdown()
        engine.stop()
    medians = {name: statistics.median(times) for name, times in bursts.items()}
    return {
        "model": model,
        "device": device,
        "threads": threads,
        "count": count,
        "steps": steps,
        "patch_size": patch_size,
        "sizes": [f"{w}x{h}" for h, w in sizes],
        "rounds": rounds,
        "group_images": images,
        "group_size": f"{w}x{h}",
        "systems": {
            name: {
                "burst_s": bursts[name],
                "median_burst_s": medians[name],
                "images_per_min": 60 * finished[name] / medians[name],  # the fewest any burst finished
                "speedup_vs_engine": medians["engine"] / medians[name],
                "finished_min": finished[name],
                "single_s": singles[name],
                "median_single_s": statistics.median(singles[name]),
                "group_s": grouped[name],
                "median_group_s": statistics.median(grouped[name]) if one_request else None,
            }
            for name in systems
        },
    }
