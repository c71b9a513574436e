"""Pool several real sweeps into one results.json: each load's figures over all of its traces.

Usage: .venv/bin/python scripts/pool_sweeps.py SWEEP [SWEEP ...] --out DIR [--reference patchedserve]
       [--rerun] [--alias OLD=NEW ...]

One sweep is one trace per load, and at a close load how one trace falls decides the point. This
reads the per-request outcomes of several ``bench slo`` folders (``outcomes/``) and, per system
and load, puts the requests of all its traces through the same metrics as one run
(``bench.results.make_run``): satisfaction is met over arrived across the traces, goodput is
per second of all their arrivals, the percentiles are over all finished requests. It writes
``DIR/results.json``, its plots and goodput at 90% on the pooled curve.

Traces are told apart by their file's content, so one trace replayed in two folders (later
invocations for other systems) counts once. At each load the compared set is the reference
system's traces: a system that did not run exactly those there is left out at that load (and
said so), as its pooled figure would come from other requests. ``--alias OLD=NEW`` counts a run
under the name OLD as a run of NEW, for a configuration that ran under another name (a side-by-side
variant that is today's default): in a folder with a run of OLD, that folder's own run of NEW is
set aside. A benchmark report, not a test.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from patchedserve.bench.metrics import RequestOutcome
from patchedserve.bench.results import (
    ALIAS_HELP,
    find_run_file,
    load_outcomes,
    load_results,
    make_run,
    parse_aliases,
    single_replica_runs,
    trace_digests,
    write_results,
)


def pool(
    folders: list[Path], reference: str, rerun: bool = False, aliases: dict[str, str] | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """The pooled runs, and a line for each (system, load) left out. A system that replayed one
    trace in two folders is an error, unless ``rerun``: then the later folder counts (a rerun of
    that system on newer code). ``aliases`` maps a run's name to the system it counts for."""
    # (system, qps) -> {trace hash: (outcomes, duration_s, slo_scale)}
    seen: dict[tuple[str, float], dict[str, tuple[list[RequestOutcome], float, float]]] = defaultdict(dict)
    for folder in folders:
        data = load_results(folder / "results.json")
        traces = trace_digests(folder)
        for system, run in single_replica_runs(data["runs"], aliases):
            qps = float(run["qps"])
            if qps not in traces:
                raise ValueError(f"{folder}: the {qps:g} req/s trace file is missing")
            digest, duration_s = traces[qps]
            path = find_run_file(folder, "outcomes", run["system"], 1, qps, float(run["slo_scale"]))
            outcomes = load_outcomes(path)
            if digest in seen[(system, qps)] and not rerun:
                raise ValueError(f"{system} replayed the {qps:g} req/s trace of {folder} twice")
            seen[(system, qps)][digest] = (outcomes, duration_s, float(run["slo_scale"]))
    runs, left_out = [], []
    for (system, qps), by_trace in sorted(seen.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        wanted = set(seen.get((reference, qps), {}))
        if set(by_trace) != wanted:
            left_out.append(
                f"{system} at {qps:g} req/s: ran {len(by_trace)} traces, {len(set(by_trace) & wanted)} "
                f"of the {len(wanted)} of {reference}"
            )
            continue
        outcomes = [o for outs, _, _ in by_trace.values() for o in outs]
        duration_s = sum(d for _, d, _ in by_trace.values())
        scale = next(iter(by_trace.values()))[2]
        run = make_run(system, qps, scale, outcomes, duration_s)
        run["traces"] = len(by_trace)
        runs.append(run)
    return runs, left_out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", nargs="+", type=Path, help="bench slo output folders")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--reference", default="patchedserve", help="whose traces each load compares on")
    ap.add_argument(
        "--rerun",
        action="store_true",
        help="a system's run of a trace in a later folder replaces its run in an earlier one",
    )
    ap.add_argument("--alias", action="append", default=[], metavar="OLD=NEW", help=ALIAS_HELP)
    args = ap.parse_args()
    try:
        aliases = parse_aliases(args.alias)
    except ValueError as err:
        ap.error(str(err))
    runs, left_out = pool(args.sweeps, args.reference, args.rerun, aliases)
    meta = {
        "kind": "pooled",
        "sweeps": [str(f) for f in args.sweeps],
        "reference": args.reference,
        "rerun": args.rerun,
        "aliases": aliases,
    }
    path = write_results(args.out, runs, {**meta, "left_out": left_out})
    for line in left_out:
        print("left out:", line)
    for run in runs:
        print(
            f"{run['qps']:>4g} req/s  {run['system']:<20} traces {run['traces']}"
            f"  requests {run['requests']:>4}  satisfaction {run['slo_satisfaction']:.3f}"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
