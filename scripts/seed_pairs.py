"""Paired comparison of systems over several real sweeps of different trace seeds.

One real sweep is one draw: a few requests of 74 decide a close point, and the machine's load
differs from run to run. Here each sweep (``bench slo ... --seed S``) replays its own trace against
every system one after the other, so at each offered load the systems meet the same requests and
a per-seed difference of SLO satisfaction pairs them. Runs pair by the trace they replayed (its
file's content), so systems of one seed may come from different folders (invocations). The script
reads the sweeps' results.json and prints, per load and system:

* the satisfaction of every seed and the pooled one (met / arrived over all seeds);
* the reference system minus this one, in percentage points: mean over seeds, a 95% t interval
  of that mean, and how many seeds the reference is ahead, level or behind.

    .venv/bin/python scripts/seed_pairs.py outputs/slo7/seed1* --reference patchedserve

``--alias OLD=NEW`` counts runs named OLD as NEW (``bench.results.single_replica_runs``).

A benchmark report, not a test; nothing here is tuned to the outcome.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from patchedserve.bench.results import (
    ALIAS_HELP,
    load_results,
    parse_aliases,
    single_replica_runs,
    trace_digests,
)


def _trace_names(folders: list[Path]) -> dict[tuple[Path, float], str]:
    """(folder, qps) -> a name for the trace that folder replayed at that load: the first folder
    (in the order given) whose trace file at that load has the same content. Folders whose
    results.json lists no readable trace name their own."""
    first: dict[tuple[float, str], str] = {}
    names: dict[tuple[Path, float], str] = {}
    for folder in folders:
        for qps, (digest, _) in trace_digests(folder).items():
            names[(folder, qps)] = first.setdefault((qps, digest), folder.name)
    return names


def _points(
    folders: list[Path],
    rerun: bool = False,
    aliases: dict[str, str] | None = None,
    slo_scale: float | None = None,
) -> dict[tuple[str, float], dict[str, tuple[int, int]]]:
    """(system, qps) -> {trace name: (met, requests)}. A system that replayed one trace in two
    folders is an error, unless ``rerun``: then the later folder counts (a rerun on newer code).
    ``aliases``: as ``bench.results.single_replica_runs``. ``slo_scale``: only the runs at that
    SLO scale (a sweep over several replays each trace once per scale)."""
    names = _trace_names(folders)
    points: dict[tuple[str, float], dict[str, tuple[int, int]]] = defaultdict(dict)
    for folder in folders:
        for system, run in single_replica_runs(load_results(folder / "results.json")["runs"], aliases):
            if slo_scale is not None and float(run["slo_scale"]) != slo_scale:
                continue
            qps = float(run["qps"])
            trace = names.get((folder, qps), folder.name)
            if trace in points[(system, qps)] and not rerun:
                raise ValueError(
                    f"{system} at {qps} req/s replayed the trace of {trace} twice"
                    " (runs at several SLO scales: choose one with --slo-scale)"
                )
            points[(system, qps)][trace] = (int(run["met"]), int(run["requests"]))
    return points


def compare(
    folders: list[Path],
    reference: str,
    rerun: bool = False,
    aliases: dict[str, str] | None = None,
    slo_scale: float | None = None,
) -> list[dict[str, Any]]:
    points = _points(folders, rerun, aliases, slo_scale)
    rows: list[dict[str, Any]] = []
    for system, qps in sorted(points, key=lambda k: (k[1], k[0])):
        own = points[(system, qps)]
        ref = points.get((reference, qps), {})
        seeds = sorted(own)
        row: dict[str, Any] = {
            "system": system,
            "qps": qps,
            "satisfaction": {s: own[s][0] / own[s][1] for s in seeds},
            "pooled": sum(m for m, _ in own.values()) / sum(n for _, n in own.values()),
        }
        paired = [s for s in seeds if s in ref]
        if system != reference and paired:
            for s in paired:
                if own[s][1] != ref[s][1]:
                    raise ValueError(
                        f"{s} at {qps} req/s: {system} saw {own[s][1]} requests, {reference} {ref[s][1]}"
                    )
            diff = np.array([100.0 * (ref[s][0] - own[s][0]) / own[s][1] for s in paired])  # [seeds] pp
            half = math.nan
            if len(diff) > 1:
                half = float(stats.t.ppf(0.975, len(diff) - 1) * diff.std(ddof=1) / math.sqrt(len(diff)))
            row["reference_minus_pp"] = {
                "mean": float(diff.mean()),
                "ci95": [float(diff.mean() - half), float(diff.mean() + half)],
                "ahead": int((diff > 0).sum()),
                "level": int((diff == 0).sum()),
                "behind": int((diff < 0).sum()),
            }
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="bench slo output folders, one per trace seed")
    ap.add_argument("--reference", default="patchedserve", help="the system the others are compared with")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="a system's run of a trace in a later folder replaces its run in an earlier one",
    )
    ap.add_argument("--alias", action="append", default=[], metavar="OLD=NEW", help=ALIAS_HELP)
    ap.add_argument("--slo-scale", type=float, help="only the runs at this SLO scale")
    args = ap.parse_args()
    try:
        aliases = parse_aliases(args.alias)
    except ValueError as err:
        ap.error(str(err))
    rows = compare(args.sweeps, args.reference, args.rerun, aliases, args.slo_scale)
    for row in rows:
        per_seed = " ".join(f"{v:.3f}" for v in row["satisfaction"].values())
        line = f"{row['qps']:>4} req/s  {row['system']:<22} pooled {row['pooled']:.3f}  seeds {per_seed}"
        pair = row.get("reference_minus_pp")
        if pair is not None:
            lo, hi = pair["ci95"]
            line += (
                f"  | {args.reference} minus: {pair['mean']:+.1f} pp [{lo:+.1f}, {hi:+.1f}]"
                f" ahead/level/behind {pair['ahead']}/{pair['level']}/{pair['behind']}"
            )
        print(line)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
