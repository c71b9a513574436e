"""How fast real steps ran inside and outside the decode worker's decodes, against the cost model.

For every system in the run directories given (each written by ``bench slo`` on one engine:
``steps/``, ``outcomes/``, and ``results.json`` naming the profile and cost files), pooled: each
step's observed over modelled time (the cost model ``simulate`` charges at speed 1, the patch
cache's per-step profile included), summed over the steps that overlapped no decode phase, those
partly inside one and those wholly inside one. A decode phase is a finished request's end of
denoising to image ready (from its outcome); overlapping phases count once. The calibration's
``decode_interference`` I predicts 1 / (1 - I) for a step wholly inside a decode.

    .venv/bin/python scripts/decode_overlap.py outputs/s24/p15c_seed*/

A benchmark report, not a test; nothing here is tuned to the outcome.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from patchedserve.bench.results import (
    find_run_file,
    load_outcomes,
    load_results,
    load_step_progress,
    load_steps,
)
from patchedserve.bench.systems import parse_systems
from patchedserve.bench.traces import load_trace
from patchedserve.cluster.commands import _load, _trajectory
from patchedserve.cluster.costs import MachineCosts, cost_model
from patchedserve.cluster.speed import Busy, decode_phases

KINDS = ("none", "partly", "wholly")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", type=Path, nargs="+", help="bench slo output folders (one engine each)")
    args = ap.parse_args()
    sums: dict[tuple[str, str], list[float]] = {}  # (system, kind) -> [observed s, modelled s, steps]
    interference = None
    for folder in args.runs:
        meta = load_results(folder / "results.json")["meta"]
        if (meta.get("replicas") or 1) > 1:
            raise SystemExit(f"{folder}: a run on Ray replicas; this reads one engine's decodes")
        costs = MachineCosts.load(meta.get("image_cost"), meta.get("patched_cost"))
        interference = costs.decode_interference
        profile = _load(meta["profile"])
        for spec in parse_systems(",".join(meta["systems"])):
            cost = cost_model(spec.execution, profile, costs, patch_cache=spec.patch_cache)
            for t in meta["traces"]:
                trajectory = _trajectory(load_trace(t["path"])[0])
                run = (spec.name, 1, t["qps"], t["slo_scale"])
                steps_path = find_run_file(folder, "steps", *run)
                outcomes = load_outcomes(find_run_file(folder, "outcomes", *run))
                busy = Busy(decode_phases(outcomes))
                logged = load_step_progress(steps_path)
                for i, (start_s, latency_s, entries) in enumerate(load_steps(steps_path)):
                    progress = None
                    if logged is not None and trajectory is not None:
                        progress = [(k, trajectory) for _, k in logged[i]]
                    modelled_s = cost.base_step_s(entries) * cost.cache_multiplier(entries, progress)
                    share = busy.overlap_s(start_s, start_s + latency_s) / latency_s
                    kind = KINDS[0] if share <= 0.0 else KINDS[2] if share >= 0.999 else KINDS[1]
                    row = sums.setdefault((spec.name, kind), [0.0, 0.0, 0.0])
                    row[0] += latency_s
                    row[1] += modelled_s
                    row[2] += 1
    print(f"{'system':<20} " + " ".join(f"{k + ' (steps)':>22}" for k in KINDS))
    for system in sorted({s for s, _ in sums}):
        cells = []
        for kind in KINDS:
            o, m, n = sums.get((system, kind), [0.0, 0.0, 0.0])
            cells.append(f"{o / m:>12.3f} ({int(n):>6})" if m > 0 else f"{'-':>22}")
        print(f"{system:<20} " + " ".join(f"{c:>22}" for c in cells))
    if interference:
        inside = 1.0 / (1.0 - interference)
        print(f"calibrated decode_interference {interference:.3f}: wholly inside predicts {inside:.3f}")


if __name__ == "__main__":
    main()
