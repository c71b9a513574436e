"""Compare systems under identical machine conditions: every system under every real run's speed.

A real sweep (``bench slo``) runs the systems one after the other, and on a shared machine each
run meets a different speed (other tenants' load), which can decide a close comparison. This
re-simulates the sweep's traces with ``simulate``'s machinery, once per (system, source run): the
costs measured before the sweep, scaled over time by the speed that the *source* run's own step
log measured (``cluster.speed``). Each system thus meets each source run's conditions, and the mean
over sources compares them on equal terms. Outcomes of the real runs are never read.

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

from patchedserve.bench.results import load_results, make_run
from patchedserve.bench.systems import objectives_s, parse_systems
from patchedserve.bench.traces import load_trace
from patchedserve.cluster.commands import _embedder, _load, _speed_reader
from patchedserve.cluster.costs import MachineCosts
from patchedserve.cluster.simulator import SimConfig, simulate


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
    ap.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = ap.parse_args()

    meta = load_results(args.sweep / "results.json")["meta"]
    profile = _load(meta["profile"])
    # The speed trace holds the decode worker's interference, as with simulate --speed-trace.
    costs = replace(
        MachineCosts.load(meta.get("image_cost"), meta.get("patched_cost")), decode_interference=0.0
    )
    speed_for = _speed_reader(args.sweep, profile, costs, args.speed_bucket)
    embedder = _embedder("model", meta["model"])
    config = SimConfig(patch_size=meta["patch_size"], max_running=meta["max_running"])
    sources = parse_systems(args.sources)
    systems = parse_systems(args.systems)
    wanted = {float(q) for q in args.qps.split(",")}
    table: dict[str, Any] = {}
    for t in meta["traces"]:
        if t["qps"] not in wanted:
            continue
        requests, _ = load_trace(t["path"])
        objectives = objectives_s(requests, profile)
        for source in sources:
            speed = speed_for(source, t["qps"])
            if speed is None:
                continue
            print(f"{source.name} @ {t['qps']:g}: speed {speed.mean:.2f}, step noise {speed.noise:.3f}")
            noise = speed.noise if args.step_noise == "measured" else float(args.step_noise)
            for spec in systems:
                embed = embedder() if spec.approx_cache and spec.nirvana_similarity == "model" else None
                outcomes = simulate(
                    requests,
                    objectives,
                    spec,
                    profile,
                    replace(costs, speed=speed, step_noise=noise),
                    config,
                    embed,
                )
                run = make_run(spec.name, t["qps"], t["slo_scale"], outcomes, t["duration_s"])
                row = table.setdefault(f"{spec.name}@{t['qps']:g}", {})
                row[source.name] = run["slo_satisfaction"]
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
