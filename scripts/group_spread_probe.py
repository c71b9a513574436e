"""One n-image request on one Ray replica against two, each replica with one CPU of its own.

Stands for replicas that each own their hardware (one GPU each): before session 22 a group sent an
``n``-image request whole to one replica, so it ran on one replica's hardware (``ray-1`` here);
now its images spread over the replicas (``ray-2``). Both groups stay up and take turns, each
round submitting the same request in one ``submit_many`` call, as the server does.

    .venv/bin/python scripts/group_spread_probe.py --images 4 --size 512 --steps 8 --rounds 4

A benchmark, not a test. (``patchedserve bench replicas`` instead shares this machine's threads
out among the replicas, so there a spread gains only what batching loses.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import ray

from patchedserve.cluster.ray_group import RayEngineGroup
from patchedserve.request import GenerationRequest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-sdxl")
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--size", type=int, default=512, help="square side in pixels")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    gens = [
        GenerationRequest("one request", width=args.size, height=args.size, steps=args.steps, seed=i)
        for i in range(args.images)
    ]
    options = {"patch_size": 256}
    groups = {f"ray-{n}": RayEngineGroup(args.model, options, n, cpus_per_replica=1) for n in (1, 2)}
    times: dict[str, list[float]] = {name: [] for name in groups}
    try:
        for group in groups.values():  # warm-up
            [f.result() for f in group.submit_many(gens)]
        for _ in range(args.rounds):
            for name, group in groups.items():
                start = time.perf_counter()
                results = [f.result() for f in group.submit_many(gens)]
                times[name].append(time.perf_counter() - start)
                assert all(r.ok for r in results), [r.error for r in results]
        spread = groups["ray-2"].dispatched
    finally:
        for group in groups.values():
            group.shutdown()
        ray.shutdown()
    medians = {name: statistics.median(t) for name, t in times.items()}
    report = {
        "args": vars(args) | {"json": None},
        "seconds": times,
        "median_s": medians,
        "ray2_over_ray1": medians["ray-2"] / medians["ray-1"],
        "ray2_dispatched": spread,
    }
    print(
        f"one {args.images}-image request, {args.size}x{args.size}, {args.steps} steps: "
        f"ray-1 {medians['ray-1']:.2f} s, ray-2 {medians['ray-2']:.2f} s "
        f"(x{report['ray2_over_ray1']:.2f}); ray-2 placed images {spread}"
    )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
