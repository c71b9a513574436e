"""Compare systems under identical machine conditions: every system under every real run's speed.

A real sweep (``bench slo``) runs the systems one after the other, and on a shared machine each
run meets a different speed (other tenants' load), which can decide a close comparison. This
re-simulates the sweep's traces with ``simulate``'s machinery, once per (system, source run): the
costs measured before the sweep, scaled over time by the speed that the *source* run's own step
log measured (``cluster.speed``), net of the source run's own decodes (the simulated system adds
its own). Each system thus meets each source run's conditions, and the mean over sources compares
them on equal terms. Of the real runs' outcomes only the decode phases are read (when the decode
worker was busy), never whether a request met its deadline.

    .venv/bin/python scripts/same_speed_replay.py outputs/slo4/sweep \\
        --sources patched-fcfs,patchedserve,patchedserve-least-slack,nirvana \\
        --systems nirvana,patchedserve,patchedserve-least-slack --qps 2,3,4
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from patchedserve.bench.results import load_results
from patchedserve.bench.systems import parse_systems
from patchedserve.bench.traces import load_trace
from patchedserve.cluster.commands import (
    _embedder,
    _load,
    _seeds,
    _speed_reader,
    _trajectory,
    _with_cache_steps,
)
from patchedserve.cluster.costs import MachineCosts
from patchedserve.cluster.simulator import SimConfig
from patchedserve.cluster.sweep import simulate_traces


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path, help="folder of a real bench slo run (results.json, steps/)")
    ap.add_argument("--sources", required=True, help="systems whose logged speed each system replays")
    ap.add_argument("--systems", required=True, help="systems to simulate")
    ap.add_argument("--qps", default="2,3,4", help="sweep points to replay")
    ap.add_argument("--speed-bucket", type=float, default=5.0, help="seconds per speed-trace bucket")
    ap.add_argument(
        "--step-noise",
        default="0",
        help="per-step jitter (std of log step time), or 'measured': the source run's",
    )
    ap.add_argument("--noise-seeds", type=_seeds, default=1, help="jitter seeds per run (expected figures)")
    ap.add_argument(
        "--patch-cache-steps", type=Path, default=None, help="per-step patch cache profile (simulate's flag)"
    )
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()

    meta = load_results(args.sweep / "results.json")["meta"]
    profile = _load(meta["profile"])
    costs = MachineCosts.load(meta.get("image_cost"), meta.get("patched_cost"))
    costs = _with_cache_steps(costs, args.patch_cache_steps)
    traces = [
        (t["qps"], t["slo_scale"], load_trace(t["path"])[0], t["duration_s"], Path(t["path"]))
        for t in meta["traces"]
        if t["qps"] in {float(q) for q in args.qps.split(",")}
    ]
    trajectories = {(trace[0], trace[1]): _trajectory(trace[2]) for trace in traces}
    speed_for = _speed_reader(args.sweep, profile, costs, args.speed_bucket, trajectories)
    embedder = _embedder("model", meta["model"])
    config = SimConfig(patch_size=meta["patch_size"], max_running=meta["max_running"])
    sources = parse_systems(args.sources)
    systems = parse_systems(args.systems)
    table: dict[str, Any] = {}
    for trace in traces:
        qps, scale = trace[0], trace[1]
        for source in sources:
            speed = speed_for(source, qps, scale)
            if speed is None:
                continue
            print(f"{source.name} @ {qps:g}: speed {speed.mean:.2f}, step noise {speed.noise:.3f}")
            noise = speed.noise if args.step_noise == "measured" else float(args.step_noise)
            runs = simulate_traces(
                [trace],
                systems,
                profile,
                replace(costs, step_noise=noise),
                config,
                embedder,
                speed_for=lambda _spec, _qps, _scale, speed=speed: speed,
                noise_seeds=args.noise_seeds,
            )
            for run in runs:
                table.setdefault(f"{run['system']}@{qps:g}", {})[source.name] = run["slo_satisfaction"]
    names = [s.name for s in sources]
    print(f"{'system @ qps':34s} {'mean':>6s}  " + "  ".join(f"{n[:14]:>14s}" for n in names))
    for key, row in table.items():
        values = [row.get(n, float("nan")) for n in names]
        print(f"{key:34s} {np.nanmean(values):6.3f}  " + "  ".join(f"{v:14.3f}" for v in values))
    if args.json is not None:
        args.json.write_text(
            json.dumps({"sweep": str(args.sweep), "sources": names, "runs": table}, indent=1)
        )


if __name__ == "__main__":
    main()
