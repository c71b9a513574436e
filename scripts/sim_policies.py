"""SLO satisfaction of several systems in simulation, pooled over fresh trace seeds and jitter draws.

Usage: .venv/bin/python scripts/sim_policies.py COSTS_DIR PROFILE --systems a,b,... --qps 1,1.5,2
       [--seeds 6] [--draws 4] [--noise 0.2] [--duration 120]

COSTS_DIR holds a run's ``image_cost.json`` and ``patched_cost.json`` (written by ``bench slo``);
PROFILE is the schedulers' latency profile. Each (system, QPS) replays ``--seeds`` traces (trace
seeds 200, 201, ...; the default sizes, steps and 5x SLO) under ``--draws`` per-step jitter draws
each, and prints the mean satisfaction over the traces. For comparing policies on a machine's
measured costs; a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
from dataclasses import replace
from pathlib import Path

from patchedserve.bench.systems import parse_systems
from patchedserve.bench.traces import TraceConfig, make_trace
from patchedserve.cluster.commands import _embedder
from patchedserve.cluster.costs import MachineCosts
from patchedserve.cluster.simulator import SimConfig
from patchedserve.cluster.sweep import simulate_traces
from patchedserve.scheduler import LatencyPredictor


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("costs_dir", type=Path)
    parser.add_argument("profile", type=Path)
    parser.add_argument("--systems", required=True)
    parser.add_argument("--qps", required=True)
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--noise", type=float, default=0.2)
    parser.add_argument("--duration", type=float, default=120.0)
    args = parser.parse_args()
    costs = MachineCosts.load(args.costs_dir / "image_cost.json", args.costs_dir / "patched_cost.json")
    costs = replace(costs, step_noise=args.noise)
    profile = LatencyPredictor.load(args.profile)
    systems = parse_systems(args.systems)
    embedder = _embedder("model", "tiny-sdxl")
    config = SimConfig(patch_size=256, max_running=12)
    for qps in (float(q) for q in args.qps.split(",")):
        cells = []
        for spec in systems:
            satisfaction = []
            for seed in range(args.seeds):
                trace = make_trace(TraceConfig(qps=qps, duration_s=args.duration, seed=200 + seed))
                runs = simulate_traces(
                    [(qps, 5.0, trace, args.duration, Path("-"))],
                    [spec],
                    profile,
                    costs,
                    config,
                    embedder,
                    noise_seeds=args.draws,
                )
                satisfaction.append(runs[0]["slo_satisfaction"])
            cells.append(f"{spec.name} {statistics.fmean(satisfaction):.3f}")
        print(f"{qps:g} req/s: " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
