"""Cost of one scheduling decision (``schedule()``) and of one step's bookkeeping, per policy.

Usage: .venv/bin/python scripts/bench_scheduler.py [--profile PROFILE] [--waiting 100] [--active 12]
       [--repeats 2000] [--out outputs/bench_scheduler.json]

Scenarios, each with ``--waiting`` queued requests (random sizes 256-1024 px, 20-50 steps, CFG on
or off, arrivals spread over the last seconds, deadlines from the policy):
* ``at_cap``: ``--active`` running requests, the cap reached, the previous decision taken: the
  decision checks the queue for infeasible requests and admits nothing (a loaded server's steady
  state);
* ``one_slot``: as ``at_cap``, then one running request finished: one admission over the queue;
* ``arrival``: as ``at_cap``, then one request arrived: the queue's arrays are rebuilt;
* ``fill``: nothing running, nothing computed yet: up to ``--active`` admissions in one call,
  arrays built inside it (the worst case).
Timings are taken with the garbage collector paused; on a shared machine the p99 includes the
time slices other processes take.
``update`` times ``update_from_output`` for a step of the full active set (online predictor update
included). Prints a table and writes JSON. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

from patchedserve.models.validation import GenerationParams
from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler import (
    LatencyPredictor,
    QueueScheduler,
    SchedulerConfig,
    StepOutcome,
    make_scheduler,
)

SYNTHETIC_COEF = (0.012, 0.015, 0.0008, 0.002, 0.0, 0.001, 0.004, 0.003)
"""Used without --profile: seconds per feature, about the tiny SDXL on one CPU core."""


def make_requests(n: int, now_s: float, rng: random.Random, first_id: int = 0) -> list[Request]:
    sizes = [256, 512, 768, 1024]
    out = []
    for i in range(n):
        w, h = rng.choice(sizes), rng.choice(sizes)
        steps = rng.randint(20, 50)
        params = GenerationParams(w, h, steps, rng.choice([1.0, 5.0]), "euler", i)
        out.append(
            Request(first_id + i, "", "", params, now_s - rng.uniform(0.0, 5.0), (w // 256) * (h // 256))
        )
    return out


def build(
    policy: str, predictor: LatencyPredictor, waiting: int, active: int, cap: int, scenario: str
) -> QueueScheduler:
    """A scheduler at t = 100 s in the given scenario (see the module docstring)."""
    rng = random.Random(0)
    s = make_scheduler(policy, predictor, SchedulerConfig(max_running=cap, slo_scale=50.0))
    now = 100.0
    for r in make_requests(0 if scenario == "fill" else active, now, rng, first_id=10_000):
        s.add_request(r, r.arrival_s)
        r.step_index = rng.randint(0, r.params.steps - 1)
    s.waiting, s.running = [], list(s.waiting)
    for r in make_requests(waiting, now, rng):
        s.add_request(r, r.arrival_s)
    if scenario == "fill":
        return s
    s.schedule(now)  # steady state: the previous decision has been taken
    if scenario == "one_slot":
        s.finish_requests([s.running[0].request_id], RequestStatus.FINISHED)
    elif scenario == "arrival":
        s.add_request(make_requests(1, now, rng, first_id=20_000)[0], now)
    return s


def time_decisions(template: QueueScheduler, repeats: int) -> dict[str, float]:
    """Microseconds per ``schedule(now)`` call, each on a fresh copy of ``template``."""
    copies = [copy.deepcopy(template) for _ in range(repeats)]
    times, admitted, dropped = [], 0, 0
    gc.collect()
    gc.disable()  # a collection of the copies' garbage is not the decision's cost
    try:
        for s in copies:
            start = time.perf_counter_ns()
            out = s.schedule(100.0)
            times.append((time.perf_counter_ns() - start) / 1e3)
            admitted, dropped = len(out.admitted), len(out.dropped)
    finally:
        gc.enable()
    return summary(times) | {"admitted": admitted, "dropped": dropped}


def time_updates(template: QueueScheduler, repeats: int) -> dict[str, float]:
    """Microseconds per ``update_from_output`` for one step of the full active set."""
    s = copy.deepcopy(template)
    running = list(s.running)
    times = []
    for _ in range(repeats):
        outcome = StepOutcome(running, 0.5, 100.0)
        start = time.perf_counter_ns()
        s.update_from_output(outcome)
        times.append((time.perf_counter_ns() - start) / 1e3)
    return summary(times)


def summary(times_us: list[float]) -> dict[str, float]:
    times_us = sorted(times_us)
    return {
        "median_us": statistics.median(times_us),
        "p90_us": times_us[min(len(times_us) - 1, int(0.90 * len(times_us)))],
        "p99_us": times_us[min(len(times_us) - 1, int(0.99 * len(times_us)))],
        "mean_us": statistics.fmean(times_us),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=None, help="latency profile (default: synthetic)")
    parser.add_argument("--waiting", type=int, default=100)
    parser.add_argument("--active", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_scheduler.json"))
    args = parser.parse_args()
    if args.profile is not None:
        predictor = LatencyPredictor.load(args.profile)
    else:
        predictor = LatencyPredictor(coef=SYNTHETIC_COEF, patch_size=256)
    scenarios = ("at_cap", "one_slot", "arrival", "fill")
    results: dict[str, Any] = {"waiting": args.waiting, "cap": args.active, "profile": str(args.profile)}
    print(f"{'policy':<6} {'scenario':<9} {'median us':>10} {'p99 us':>9} {'admitted':>8}")
    for policy in ("fcfs", "slo"):
        for name in scenarios:
            template = build(policy, predictor, args.waiting, args.active, args.active, name)
            row = time_decisions(template, args.repeats)
            results[f"{policy}/{name}"] = row
            print(
                f"{policy:<6} {name:<9} {row['median_us']:>10.1f} {row['p99_us']:>9.1f} {row['admitted']:>8}"
            )
        row = time_updates(
            build(policy, predictor, args.waiting, args.active, args.active, "at_cap"), args.repeats
        )
        results[f"{policy}/update"] = row
        print(f"{policy:<6} {'update':<9} {row['median_us']:>10.1f} {row['p99_us']:>9.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
