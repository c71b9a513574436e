"""The latency predictor's online update on the real machine: error per step before and after a slowdown.

Usage: .venv/bin/python scripts/predictor_drift.py --profile PROFILE [--before 40] [--after 80]
       [--burners 1] [--out outputs/predictor_drift.json]

Runs real patched denoising steps (random inputs) over an engine-like sequence of mixes (each mix
held for a few steps, as requests join and leave), predicting every step before running it and
feeding the measured latency back (``observe``), as the scheduler does. After ``--before`` steps it
starts ``--burners`` CPU-burning processes pinned to the CPU this process runs on, which takes
about half of that CPU away (a slowdown of about 2x); they are bounded in time and killed at the
end. Prints the error per step and writes JSON with the recovery figures and the machine's load
average per step (other people's processes on a shared machine slow steps too, and show there).
A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from patchedserve.models import load_model
from patchedserve.patch import PatchedModel
from patchedserve.scheduler import Entry, LatencyPredictor
from patchedserve.scheduler.config import DEFAULT_SIZES
from patchedserve.scheduler.profile import BatchMaker

BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"
"""A burner's program: spin until its time is up (so it ends even if this script is killed)."""


def mixes(rng: random.Random, sizes: list[tuple[int, int]], count: int, hold: int) -> list[tuple[Entry, ...]]:
    """``count`` steps of mixes of 1-6 requests, each mix held for ``hold`` steps."""
    out: list[tuple[Entry, ...]] = []
    while len(out) < count:
        mix = tuple((*rng.choice(sizes), rng.random() < 0.5) for _ in range(rng.randint(1, 6)))
        out += [mix] * hold
    return out[:count]


def start_burners(count: int, cpu: int, seconds: float) -> list[subprocess.Popen[bytes]]:
    procs = []
    for _ in range(count):
        proc = subprocess.Popen([sys.executable, "-c", BURN.format(seconds=seconds)])
        os.sched_setaffinity(proc.pid, {cpu})
        procs.append(proc)
    return procs


def recovery_step(errors: list[float], threshold: float = 0.05, window: int = 5) -> int | None:
    """First step from which the mean error of the next ``window`` steps is under ``threshold``."""
    for k in range(len(errors) - window + 1):
        if statistics.fmean(errors[k : k + window]) < threshold:
            return k
    return None


def summarise(rows: list[dict[str, Any]], before: int, burners: int, correction: float) -> dict[str, Any]:
    errors_before = [r["error"] for r in rows[:before]]
    after = rows[before:]
    errors_after = [r["error"] for r in after]
    first_under = next((k for k, e in enumerate(errors_after) if e < 0.05), None)
    return {
        "mape_before_pct": 100 * statistics.fmean(errors_before[10:] or errors_before),
        "slowdown": statistics.median(r["actual_s"] / r["predicted_s"] for r in after[:3]),
        "error_first_step_after_pct": 100 * errors_after[0],
        "steps_to_first_step_under_5pct": first_under,
        "steps_to_5_step_mean_under_5pct": recovery_step(errors_after),
        "mape_after_steps_10_50_pct": 100 * statistics.fmean(errors_after[10:50]),
        "median_ape_after_steps_10_50_pct": 100 * statistics.median(errors_after[10:50]),
        "mape_after_last_30_pct": 100 * statistics.fmean(errors_after[-30:]),
        "max_load_avg_1m": max(r["load_avg_1m"] for r in rows),
        "final_correction": correction,
        "burners": burners,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, required=True)
    parser.add_argument("--before", type=int, default=40, help="steps before the slowdown")
    parser.add_argument("--after", type=int, default=80, help="steps after the slowdown starts")
    parser.add_argument("--burners", type=int, default=1, help="CPU-burning processes on our CPU")
    parser.add_argument("--hold", type=int, default=4, help="steps each mix is held for")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/predictor_drift.json"))
    args = parser.parse_args()

    predictor = LatencyPredictor.load(args.profile)
    meta = predictor.meta
    torch.set_num_threads(int(meta.get("threads", 1)))
    cpu = sorted(os.sched_getaffinity(0))[0]
    os.sched_setaffinity(0, {cpu})  # one CPU, so the burners compete with us and not with the others
    bundle = load_model(meta.get("model", "tiny-sdxl"))
    pm = PatchedModel(
        bundle.denoiser, patch_size=predictor.patch_size, vae_scale_factor=bundle.vae_scale_factor
    )
    sizes = [tuple(s) for s in meta.get("config", {}).get("sizes", DEFAULT_SIZES)]
    make = BatchMaker(bundle, pm, args.seed)
    steps = mixes(random.Random(args.seed), sizes, args.before + args.after, args.hold)  # type: ignore[arg-type]
    pm.forward_batch(make(steps[0]))  # warm-up

    rows: list[dict[str, Any]] = []
    burners: list[subprocess.Popen[bytes]] = []
    try:
        batch, previous = None, None
        for k, mix in enumerate(steps):
            if k == args.before:
                burners = start_burners(args.burners, cpu, seconds=10 * 60)
            if mix is not previous:
                batch, previous = make(mix), mix
            assert batch is not None
            predicted = predictor.predict_step(mix)
            start = time.perf_counter()
            pm.forward_batch(batch)
            actual = time.perf_counter() - start
            predictor.observe(mix, actual)
            error = abs(predicted / actual - 1.0)
            load = os.getloadavg()[0]  # other people's work shows up here
            row = {"step": k - args.before, "predicted_s": predicted, "actual_s": actual, "error": error}
            rows.append(row | {"load_avg_1m": load})
            print(
                f"{k - args.before:>4} predicted {predicted:.3f} s actual {actual:.3f} s, {100 * error:5.1f}%"
            )
    finally:
        for proc in burners:
            proc.kill()
            proc.wait()

    summary = summarise(rows, args.before, args.burners, predictor.correction)
    print(json.dumps(summary, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"summary": summary, "steps": rows, "profile": str(args.profile)}, indent=1) + "\n"
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
