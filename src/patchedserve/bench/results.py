"""``results.json`` of a real or simulated SLO benchmark, and the plots next to it.

Layout: ``{"meta": {...}, "runs": [...], "goodput_at_90": {...}}``. Each run holds ``system``,
``qps``, ``slo_scale``, ``slo_satisfaction``, ``goodput_rps``, ``p50_s``, ``p90_s``, ``p99_s``,
``drop_rate``, ``per_resolution`` (the same figures per ``"WxH"``), plus ``replicas``, counts,
``unfinished_rate`` and ``latencies_s`` (finished requests, for the CDF plot). Per-request
outcomes go to ``outcomes/<system>_<replicas>r_<qps>qps_slo<scale>.jsonl`` and, for real runs, every
executed step to ``steps/<same>.jsonl`` (what ``cluster.speed`` reads the machine's speed from). Written by
``bench slo`` and ``simulate``; read back by ``simulate --compare``.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from patchedserve.bench.metrics import RequestOutcome, goodput_at_target, summarize_run
from patchedserve.bench.plots import plot_all
from patchedserve.errors import InvalidRequestError
from patchedserve.scheduler import Entry

StepRecord = tuple[float, float, list[Entry]]
"""One executed step: (start s from the trace start, latency s, its requests as (width, height, CFG))."""
StepProgress = list[tuple[int, int]]
"""The requests of one executed step as (request id, step index taken), in ``StepRecord`` order."""


def make_run(
    system: str,
    qps: float,
    slo_scale: float,
    outcomes: Sequence[RequestOutcome],
    duration_s: float,
    replicas: int = 1,
) -> dict[str, Any]:
    """One ``runs`` entry (figures of ``bench.metrics.summarize_run`` plus the latencies)."""
    run = summarize_run(system, qps, slo_scale, outcomes, duration_s)
    run["replicas"] = replicas
    run["duration_s"] = duration_s
    run["arrival_rps"] = len(outcomes) / duration_s  # the trace's realised rate (qps is the nominal one)
    run["latencies_s"] = sorted(
        round(o.latency_s, 4) for o in outcomes if o.status == "finished" and o.latency_s is not None
    )
    return run


def run_file(out_dir: Path, kind: str, system: str, replicas: int, qps: float, slo_scale: float) -> Path:
    """``out_dir/<kind>/<system>_<replicas>r_<qps>qps_slo<scale>.jsonl`` (kind: outcomes or steps)."""
    return out_dir / kind / f"{system}_{replicas}r_{qps:g}qps_slo{slo_scale:g}.jsonl"


def find_run_file(out_dir: Path, kind: str, system: str, replicas: int, qps: float, slo_scale: float) -> Path:
    """The file of a run to read: ``run_file``'s, or the name folders written before session 26 used,
    without the SLO scale (such a folder kept only its last scale's files for each load)."""
    path = run_file(out_dir, kind, system, replicas, qps, slo_scale)
    legacy = out_dir / kind / f"{system}_{replicas}r_{qps:g}qps.jsonl"
    return path if path.exists() or not legacy.exists() else legacy


def save_outcomes(out_dir: Path, run: dict[str, Any], outcomes: Sequence[RequestOutcome]) -> Path:
    path = run_file(out_dir, "outcomes", run["system"], run["replicas"], run["qps"], run["slo_scale"])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(asdict(o)) + "\n" for o in outcomes))
    return path


def load_outcomes(path: Path) -> list[RequestOutcome]:
    """The outcomes ``save_outcomes`` wrote."""
    lines = Path(path).read_text().splitlines()
    return [RequestOutcome(**json.loads(line)) for line in lines if line.strip()]


def save_steps(
    out_dir: Path,
    run: dict[str, Any],
    steps: Sequence[StepRecord],
    progress: Sequence[StepProgress] | None = None,
    replica: Sequence[int] | None = None,
) -> Path:
    """One JSON line per step: ``[start_s, latency_s, [[w, h, cfg], ...], [[id, step], ...]]``
    (the last only with ``progress``), then, for a run on Ray replicas, the replica's index."""
    path = run_file(out_dir, "steps", run["system"], run["replicas"], run["qps"], run["slo_scale"])
    path.parent.mkdir(parents=True, exist_ok=True)
    rows: list[list[Any]] = [
        [round(t, 4), round(lat, 5), [list(e) for e in entries]] for t, lat, entries in steps
    ]
    if progress is not None:
        for row, taken in zip(rows, progress, strict=True):
            row.append([list(p) for p in taken])
    if replica is not None:
        if progress is None:
            raise ValueError("a step log's replica indices need its progress")
        for row, index in zip(rows, replica, strict=True):
            row.append(index)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load_steps(path: Path) -> list[StepRecord]:
    records: list[StepRecord] = []
    for row in _rows(path):
        t, latency, entries = row[:3]
        records.append((float(t), float(latency), [(int(w), int(h), bool(c)) for w, h, c in entries]))
    return records


def load_step_progress(path: Path) -> list[StepProgress] | None:
    """Each logged step's (request id, step index) per request; None for logs written without
    them (before session 17)."""
    rows = _rows(path)
    if not rows or any(len(row) < 4 for row in rows):
        return None
    return [[(int(i), int(k)) for i, k in row[3]] for row in rows]


def load_step_replicas(path: Path) -> list[int] | None:
    """Each logged step's replica index, for a run on Ray replicas; None for one engine's log."""
    rows = _rows(path)
    if not rows or any(len(row) < 5 for row in rows):
        return None
    return [int(row[4]) for row in rows]


def _rows(path: Path) -> list[list[Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def machine_info() -> dict[str, Any]:
    """CPU count and load average: the machine may be shared, which the figures depend on."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "loadavg": load,
        "python": platform.python_version(),
    }


def write_results(out_dir: Path, runs: list[dict[str, Any]], meta: dict[str, Any]) -> Path:
    """Writes ``results.json`` and the plots; returns the JSON's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = {"meta": meta, "runs": runs, "goodput_at_90": goodput_at_target(runs)}
    path = out_dir / "results.json"
    path.write_text(json.dumps(data, indent=1) + "\n")
    plot_all(runs, out_dir)
    return path


def trace_digests(folder: Path) -> dict[float, tuple[str, float]]:
    """qps -> (SHA-256 of the trace file, its duration s) for the traces ``folder/results.json``
    lists: equal digests mean the same requests, whichever folder replayed them. A trace whose
    recorded path is gone is looked up in ``folder/traces``; one not found there is skipped."""
    out = {}
    for trace in load_results(folder / "results.json")["meta"].get("traces", []):
        path = Path(trace["path"])
        if not path.is_file():
            path = folder / "traces" / path.name
        if path.is_file():
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            out[float(trace["qps"])] = (digest, float(trace["duration_s"]))
    return out


def single_replica_runs(
    runs: Sequence[dict[str, Any]], aliases: Mapping[str, str] | None = None
) -> list[tuple[str, dict[str, Any]]]:
    """(system, run) for each one-replica run of one results.json, for pooling runs across
    folders. ``aliases`` maps a run's name to the system it counts for (a side-by-side variant
    that ran a configuration under another name); where a run of an alias is present, the
    results' own run of the system it stands for is set aside."""
    aliases = aliases or {}
    names = {run["system"] for run in runs}
    replaced = {new for old, new in aliases.items() if old in names}
    return [
        (aliases.get(run["system"], run["system"]), run)
        for run in runs
        if run.get("replicas", 1) == 1 and run["system"] not in replaced
    ]


ALIAS_HELP = "count runs named OLD as NEW (that folder's own NEW run is set aside); repeatable"
"""The ``--alias OLD=NEW`` option's help, for the scripts that pool or pair runs."""


def parse_aliases(texts: Sequence[str]) -> dict[str, str]:
    """``["OLD=NEW", ...]`` -> {OLD: NEW}; raises ValueError on another form."""
    pairs = [t.split("=", 1) for t in texts]
    if any(len(p) != 2 or not all(p) for p in pairs):
        raise ValueError(f"an alias is OLD=NEW; got {list(texts)}")
    return {old: new for old, new in pairs}


def load_results(path: Path) -> dict[str, Any]:
    """A ``results.json`` written by ``bench slo`` or ``simulate``; InvalidRequestError for any
    other file."""
    not_results = f"{path} is not a results.json of bench slo or simulate"
    try:
        data = json.loads(Path(path).read_text())
    except json.JSONDecodeError as err:
        raise InvalidRequestError(f"{not_results} (not JSON: {err})", field="results") from err
    if not isinstance(data, dict) or "runs" not in data or "meta" not in data:
        raise InvalidRequestError(not_results, field="results")
    return data


def table_lines(runs: Sequence[dict[str, Any]]) -> list[str]:
    """A plain-text table of the runs, one line each."""
    head = (
        f"{'system':<13} {'rep':>3} {'qps':>6} {'slo':>4} {'n':>5} {'sat':>6} {'goodput':>8} "
        f"{'p50':>7} {'p90':>7} {'p99':>7} {'drop':>6} {'unfin':>6}"
    )
    lines = [head]
    for r in runs:

        def f(v: float | None, w: int = 7, p: int = 2) -> str:
            return f"{v:>{w}.{p}f}" if v is not None else f"{'-':>{w}}"

        lines.append(
            f"{r['system']:<13} {r.get('replicas', 1):>3} {r['qps']:>6.3g} {r['slo_scale']:>4g} "
            f"{r['requests']:>5} "
            f"{f(r['slo_satisfaction'], 6, 3)} {f(r['goodput_rps'], 8, 3)} {f(r['p50_s'])} {f(r['p90_s'])} "
            f"{f(r['p99_s'])} {f(r['drop_rate'], 6, 3)} {f(r['unfinished_rate'], 6, 3)}"
        )
    return lines


def goodput_lines(goodput: dict[str, Any]) -> list[str]:
    """The goodput-at-90% table: QPS at 90% satisfaction per system and the reference's ratio."""
    lines = [
        f"highest QPS at >= {goodput['target']:.0%} SLO satisfaction "
        f"(ratio = {goodput['reference']} / system):"
    ]
    for key, v in goodput["systems"].items():
        qps = "-" if v["qps"] is None else f"{v['qps']:.3g}"
        bound = {
            "at_least": " (at least: never below in the sweep)",
            "below_sweep": " (below the sweep)",
        }.get(v["bound"], "")
        ratio = "-" if v["ratio"] is None else f"{v['ratio']:.2f}x"
        lines.append(f"  {key:<20} qps {qps:>6}{bound}  ratio {ratio}")
    return lines
