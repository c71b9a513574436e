"""Simulated sweeps (``patchedserve simulate``) and the check against a real replay (``--compare``).

``simulate_traces`` runs every (trace, system) in virtual time and returns ``results.json`` runs.
``compare_runs`` pairs them with a real ``bench slo`` run on the same traces: per (system, QPS),
the real and simulated SLO satisfaction, their difference in percentage points, and the same for
the median latency and the drop rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from patchedserve.bench.results import make_run
from patchedserve.bench.slo_commands import Trace
from patchedserve.bench.systems import SystemSpec, objectives_s
from patchedserve.cluster.costs import MachineCosts
from patchedserve.cluster.replica import Embedder
from patchedserve.cluster.simulator import SimConfig, simulate
from patchedserve.cluster.speed import SpeedTrace
from patchedserve.scheduler import LatencyPredictor


def simulate_traces(
    traces: Sequence[Trace],
    systems: Sequence[SystemSpec],
    profile: LatencyPredictor,
    costs: MachineCosts,
    config: SimConfig,
    embedder: Callable[[], Embedder] | None = None,
    log: Callable[[str], None] | None = None,
    speed_for: Callable[[SystemSpec, float, float], SpeedTrace | None] | None = None,
    measured_noise: bool = False,
    noise_seeds: int = 1,
    engine_profile: LatencyPredictor | None = None,
) -> list[dict[str, Any]]:
    """One run per (trace, system) on ``config.replicas`` simulated engines; ``speed_for`` (system,
    qps, SLO scale) gives the machine's speed over that run's time (``cluster.speed``), if any, and with
    ``measured_noise`` also its per-step jitter (else ``costs.step_noise``). Deadlines come from
    ``profile``; the engines' schedulers and the dispatcher load ``engine_profile`` (default: the
    same), as real replicas may be given a profile of their own.

    With jitter, one simulation is one draw of it, as a real run is; ``noise_seeds`` > 1 replays
    the trace under that many seeds and pools the outcomes, so the run's figures are the expected
    ones (satisfaction: the mean over seeds) and ``seed_satisfaction`` lists each seed's."""
    if noise_seeds < 1:
        raise ValueError(f"noise_seeds must be >= 1, got {noise_seeds}")
    runs = []
    for qps, scale, requests, duration_s, _ in traces:
        objectives = objectives_s(requests, profile)
        for spec in systems:
            start = time.perf_counter()
            exact = spec.nirvana_similarity == "exact"
            embed = embedder() if spec.approx_cache and embedder is not None and not exact else None
            speed = speed_for(spec, qps, scale) if speed_for is not None else None
            run_costs = replace(costs, speed=speed)
            if speed is not None:  # a speed with the decode interference inside: not added again
                run_costs = replace(run_costs, decode_interference=speed.decode_interference or 0.0)
            if speed is not None and speed.admission_s is not None:
                run_costs = replace(run_costs, admission_s=speed.admission_s)
            if measured_noise and speed is not None:
                run_costs = replace(run_costs, step_noise=speed.noise)
            seeds = noise_seeds if run_costs.step_noise > 0.0 else 1
            pooled, per_seed = [], []
            for seed in range(seeds):
                outcomes = simulate(
                    requests,
                    objectives,
                    spec,
                    engine_profile or profile,
                    run_costs,
                    replace(config, noise_seed=seed),
                    embed,
                )
                pooled += outcomes
                per_seed.append(make_run(spec.name, qps, scale, outcomes, duration_s)["slo_satisfaction"])
            run = make_run(spec.name, qps, scale, pooled, duration_s * seeds, replicas=config.replicas)
            run["duration_s"] = duration_s  # the trace's; the figures pool ``seeds`` replays of it
            run["noise_seeds"] = seeds
            run["seed_satisfaction"] = per_seed
            run["sim_wall_s"] = time.perf_counter() - start
            run["speed_mean"] = speed.mean if speed is not None else None
            run["step_noise"] = run_costs.step_noise
            run["decode_interference"] = run_costs.decode_interference
            runs.append(run)
            if log is not None:
                log(
                    f"{spec.name} x{config.replicas} @ {qps:g} qps: {len(requests)} requests in "
                    f"{run['sim_wall_s']:.2f} s, satisfaction {run['slo_satisfaction']:.3f}"
                )
    return runs


def _key(run: dict[str, Any]) -> tuple[str, float, float]:
    return run["system"], float(run["qps"]), float(run["slo_scale"])


def _diff(a: float | None, b: float | None, scale: float = 1.0) -> float | None:
    return None if a is None or b is None else scale * (b - a)


def compare_runs(real: Sequence[dict[str, Any]], sim: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (system, qps, slo_scale, real/sim figures, differences); sim minus real."""
    by_key = {_key(r): r for r in sim}
    rows = []
    for r in real:
        s = by_key.get(_key(r))
        if s is None:
            continue
        rows.append(
            {
                "system": r["system"],
                "qps": r["qps"],
                "slo_scale": r["slo_scale"],
                "requests": r["requests"],
                "real_satisfaction": r["slo_satisfaction"],
                "sim_satisfaction": s["slo_satisfaction"],
                "satisfaction_diff_pp": _diff(r["slo_satisfaction"], s["slo_satisfaction"], 100.0),
                "real_p50_s": r["p50_s"],
                "sim_p50_s": s["p50_s"],
                "p50_diff_s": _diff(r["p50_s"], s["p50_s"]),
                "real_drop_rate": r["drop_rate"],
                "sim_drop_rate": s["drop_rate"],
                "real_decode_p50_s": r.get("decode_p50_s"),
                "sim_decode_p50_s": s.get("decode_p50_s"),
                "sim_seed_satisfaction": s.get("seed_satisfaction"),
                "speed_mean": s.get("speed_mean"),
            }
        )
    return rows


def compare_lines(rows: Sequence[dict[str, Any]], tolerance_pp: float = 5.0) -> list[str]:
    """A table of ``compare_runs`` rows and the verdict against ``tolerance_pp``."""

    def f(v: float | None, spec: str) -> str:
        return format("-", ">" + spec.split(".")[0].lstrip("+")) if v is None else format(v, spec)

    lines = [
        f"{'system':<13} {'qps':>5} {'n':>4} {'real sat':>8} {'sim sat':>8} {'diff pp':>8} "
        f"{'real p50':>8} {'sim p50':>8} {'real drop':>9} {'sim drop':>8} {'real dec':>8} {'sim dec':>8} "
        f"{'speed':>6} {'sim seeds':>13}"
    ]
    for r in rows:
        seeds = r.get("sim_seed_satisfaction") or []
        spread = f"{min(seeds):.3f}-{max(seeds):.3f}" if len(seeds) > 1 else "-"
        lines.append(
            f"{r['system']:<13} {r['qps']:>5g} {r['requests']:>4} {f(r['real_satisfaction'], '8.3f')} "
            f"{f(r['sim_satisfaction'], '8.3f')} {f(r['satisfaction_diff_pp'], '+8.1f')} "
            f"{f(r['real_p50_s'], '8.2f')} {f(r['sim_p50_s'], '8.2f')} {f(r['real_drop_rate'], '9.3f')} "
            f"{f(r['sim_drop_rate'], '8.3f')} {f(r.get('real_decode_p50_s'), '8.3f')} "
            f"{f(r.get('sim_decode_p50_s'), '8.3f')} {f(r.get('speed_mean'), '6.2f')} {spread:>13}"
        )
    diffs = [abs(r["satisfaction_diff_pp"]) for r in rows if r["satisfaction_diff_pp"] is not None]
    if diffs:
        worst = max(diffs)
        verdict = "within" if worst <= tolerance_pp else "NOT within"
        lines.append(
            f"largest |difference| {worst:.1f} pp over {len(diffs)} runs: {verdict} {tolerance_pp:g} pp"
        )
    return lines
