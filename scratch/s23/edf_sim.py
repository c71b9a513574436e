"""Experiment: an EDF step set (least budget first, shortest prefix with near-full batch efficiency)
against the committed step_set, in the simulator on a machine's costs. Monkeypatches slo.step_set."""
from __future__ import annotations

import statistics
import sys
from dataclasses import replace
from pathlib import Path

import patchedserve.scheduler.slo as slo
from patchedserve.bench.systems import parse_systems
from patchedserve.bench.traces import TraceConfig, make_trace
from patchedserve.cluster.commands import _embedder
from patchedserve.cluster.costs import MachineCosts
from patchedserve.cluster.simulator import SimConfig
from patchedserve.cluster.sweep import simulate_traces
from patchedserve.scheduler import LatencyPredictor
from patchedserve.scheduler.deadline import entry_of
from patchedserve.scheduler.pausing import _affords, set_step_s, step_set

ORIG = step_set


def make_edf(tol: float):
    def edf_step_set(predictor, active, budget, fixed):
        if len(active) < 2:
            return list(active)
        full_s = set_step_s(predictor, active)
        budgets = {r.request_id: budget(r) for r in active}
        solo = {r.request_id: predictor.solo_step_s(entry_of(r)) for r in active}
        eff_full = sum(solo.values()) / full_s
        order = sorted(active, key=lambda r: (r.request_id not in fixed, budgets[r.request_id]))
        for k in range(1, len(order)):
            head, rest = order[:k], order[k:]
            if any(r.request_id in fixed for r in rest):
                continue
            head_s = set_step_s(predictor, head)
            if sum(solo[r.request_id] for r in head) / head_s < (1 - tol) * eff_full:
                continue
            if all(_affords(v, budgets[v.request_id], head_s, full_s) for v in rest):
                ids = {r.request_id for r in head}
                return [r for r in active if r.request_id in ids]
        return ORIG(predictor, active, budget, fixed)
    return edf_step_set


def main() -> None:
    costs_dir, profile_path = Path(sys.argv[1]), Path(sys.argv[2])
    qps_list = [float(q) for q in sys.argv[3].split(",")]
    tols = [float(t) for t in sys.argv[4].split(",")]
    seeds, draws, duration = 6, 3, 120.0
    costs = MachineCosts.load(costs_dir / "image_cost.json", costs_dir / "patched_cost.json")
    costs = replace(costs, step_noise=0.2)
    profile = LatencyPredictor.load(profile_path)
    embedder = _embedder("model", "tiny-sdxl")
    config = SimConfig(patch_size=256, max_running=12)
    variants = [("nirvana", None), ("patchedserve", None)] + [("patchedserve", t) for t in tols]
    for qps in qps_list:
        cells = []
        for name, tol in variants:
            slo.step_set = ORIG if tol is None else make_edf(tol)
            (spec,) = parse_systems(name)
            sat = []
            for seed in range(seeds):
                trace = make_trace(TraceConfig(qps=qps, duration_s=duration, seed=200 + seed))
                runs = simulate_traces([(qps, 5.0, trace, duration, Path("-"))], [spec], profile, costs, config,
                                       embedder, noise_seeds=draws)
                sat.append(runs[0]["slo_satisfaction"])
            label = name if tol is None else f"edf{tol:g}"
            cells.append(f"{label} {statistics.mean(sat):.3f}")
        print(f"qps {qps:g}: " + "  ".join(cells), flush=True)


main()
