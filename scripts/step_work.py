"""Where each system's machine time went in real `bench slo` runs: steps run, and their cost per pixel.

A system can meet more deadlines by running fewer steps (NIRVANA starts requests from cached
latents) or by running each step more cheaply (patched batching). For every system in the run
directories given (each written by ``bench slo``: ``steps/``, ``outcomes/``, ``traces/``), pooled:

* requests arrived, finished and met, and of the late ones, how many were still on time when their
  denoising ended (late in the decode tail: the wait for the decode worker and the decode), where
  the outcomes record it (``denoised_s``, since session 12);
* request-steps run (a request with CFG counts once per step), and what share they are of the steps
  its finished requests asked for;
* the summed step time, and that time per megapixel-step (each request-step weighted by its image's
  pixels, twice with CFG): the cost of denoising one megapixel for one step, whatever the batching.

    .venv/bin/python scripts/step_work.py outputs/slo12/p3_seed*/

A benchmark report, not a test; nothing here is tuned to the outcome.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

RUN_NAME = re.compile(r"(?P<system>[^_]+)_(?P<replicas>\d+)r_(?P<qps>[^_]+)qps(?:_slo(?P<scale>[^_]+))?")
"""A run's file name (``bench.results.run_file``), or the one before session 26 (no ``_slo``)."""


@dataclass
class Work:
    arrived: int = 0
    finished: int = 0
    met: int = 0
    late_in_tail: int = 0
    """Finished late although on time at the end of their denoising."""
    request_steps: int = 0
    asked_steps: int = 0
    """Steps asked for by the finished requests (their trace's ``steps``)."""
    step_s: float = 0.0
    megapixel_steps: float = 0.0

    @property
    def step_share(self) -> float:
        return self.request_steps / self.asked_steps if self.asked_steps else float("nan")

    @property
    def s_per_megapixel_step(self) -> float:
        return self.step_s / self.megapixel_steps if self.megapixel_steps else float("nan")


def _jsonl(path: Path) -> list[Any]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def add_run(run_dir: Path, totals: dict[str, Work]) -> None:
    """Adds one ``bench slo`` output directory's step logs and outcomes to ``totals`` (per system)."""
    traces = {p.stem: _jsonl(p)[1:] for p in sorted((run_dir / "traces").glob("*.jsonl"))}  # header first
    for log in sorted((run_dir / "steps").glob("*.jsonl")):
        name = RUN_NAME.fullmatch(log.stem)
        if name is None:
            raise ValueError(f"{log}: not a run's step log (<system>_<replicas>r_<qps>qps_slo<scale>)")
        system, qps, scale = name["system"], name["qps"], name["scale"]
        work = totals[system]
        for _, seconds, entries, *_ in _jsonl(log):  # [time_s, seconds, [[width, height, cfg], ...], ...]
            work.step_s += float(seconds)
            work.request_steps += len(entries)
            work.megapixel_steps += sum(w * h * (2 if cfg else 1) for w, h, cfg in entries) / 1e6
        outcomes = run_dir / "outcomes" / log.name
        if scale is None:  # written before session 26: no scale in the name, one scale's files per load
            trace = next(t for stem, t in traces.items() if stem.startswith(f"qps{qps}_"))
        else:
            trace = traces[f"qps{qps}_slo{scale}"]
        for row in _jsonl(outcomes):
            work.arrived += 1
            if row["status"] == "finished":
                work.finished += 1
                work.met += row["latency_s"] <= row["slo_s"]
                denoised_s = row.get("denoised_s")
                late_in_tail = denoised_s is not None and denoised_s <= row["slo_s"] < row["latency_s"]
                work.late_in_tail += late_in_tail
                work.asked_steps += int(trace[row["index"]]["steps"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path, help="bench slo output directories")
    args = ap.parse_args()
    totals: dict[str, Work] = defaultdict(Work)
    for run in args.runs:
        add_run(run, totals)
    for system, w in totals.items():
        print(
            f"{system:22s} arrived {w.arrived} finished {w.finished} met {w.met} "
            f"(late in the decode tail {w.late_in_tail}); request-steps run "
            f"{w.request_steps} ({w.step_share:.3f} of those asked by the finished); step time "
            f"{w.step_s:.0f} s, {w.s_per_megapixel_step * 1e3:.1f} ms per megapixel-step"
        )


if __name__ == "__main__":
    main()
