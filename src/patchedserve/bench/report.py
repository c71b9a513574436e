"""Markdown tables of a ``results.json`` (``patchedserve bench report``), as docs/benchmarks.md shows them.

A satisfaction matrix (systems x QPS, one per replica count and SLO scale), the full run table,
the goodput at 90% SLO satisfaction with the reference's ratios, and every point where the
reference system's satisfaction is below another system's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from patchedserve.bench.metrics import goodput_at_target
from patchedserve.bench.systems import SYSTEMS

Run = dict[str, Any]


def _num(v: float | None, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def _settings(runs: Sequence[Run]) -> list[tuple[int, float]]:
    return sorted({(int(r.get("replicas", 1)), float(r["slo_scale"])) for r in runs})


def _systems(runs: Sequence[Run]) -> list[str]:
    order = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted({r["system"] for r in runs}, key=lambda s: (order.get(s, len(order)), s))


def satisfaction_matrix(runs: Sequence[Run], key: str = "slo_satisfaction") -> list[str]:
    """Systems x offered QPS of ``key``, one table per (replicas, SLO scale)."""
    lines = []
    for replicas, scale in _settings(runs):
        sel = [r for r in runs if (int(r.get("replicas", 1)), float(r["slo_scale"])) == (replicas, scale)]
        qps = sorted({r["qps"] for r in sel})
        lines.append(f"{replicas} replica(s), SLO {scale:g}x, {key}:")
        lines.append("")
        lines.append("| system | " + " | ".join(f"{q:g} req/s" for q in qps) + " |")
        lines.append("|---|" + "---:|" * len(qps))
        for system in _systems(sel):
            cells = [
                next((r[key] for r in sel if r["system"] == system and r["qps"] == q), None) for q in qps
            ]
            lines.append(f"| {system} | " + " | ".join(_num(c) for c in cells) + " |")
        lines.append("")
    return lines


def run_table(runs: Sequence[Run]) -> list[str]:
    """Every run: requests, satisfaction, goodput, latency percentiles, drop and unfinished rates."""
    lines = [
        "| system | replicas | QPS | n (arrived/s) | SLO sat. | goodput (req/s) | P50 (s) | P90 (s) "
        "| P99 (s) | drop | unfinished |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs:
        lines.append(
            f"| {r['system']} | {r.get('replicas', 1)} | {r['qps']:g} | "
            f"{r['requests']} ({r['requests'] / r.get('duration_s', 1.0):.2f}) | "
            f"{_num(r['slo_satisfaction'])} | {_num(r['goodput_rps'])} | {_num(r['p50_s'], '.2f')} | "
            f"{_num(r['p90_s'], '.2f')} | {_num(r['p99_s'], '.2f')} | {_num(r['drop_rate'])} | "
            f"{_num(r.get('unfinished_rate'))} |"
        )
    return lines


def goodput_table(goodput: dict[str, Any]) -> list[str]:
    """Highest QPS at the target satisfaction per system and setting, and the reference's ratio."""
    bounds = {"exact": "", "at_least": " (at least: the whole sweep)", "below_sweep": " (below the sweep)"}
    lines = [
        f"| system @ setting | QPS at >= {goodput['target']:.0%} | {goodput['reference']} / system |",
        "|---|---:|---:|",
    ]
    for key, v in goodput["systems"].items():
        qps = "-" if v["qps"] is None else f"{v['qps']:.2f}"
        lines.append(f"| {key} | {qps}{bounds[v['bound']]} | {_num(v['ratio'], '.2f')} |")
    return lines


def shortfalls(runs: Sequence[Run], reference: str = "patchedserve") -> list[str]:
    """Each point where ``reference``'s satisfaction is below another system's."""
    lines = []
    for r in runs:
        if r["system"] == reference:
            continue
        same = (r["qps"], r["slo_scale"], r.get("replicas", 1))
        ref = next(
            (
                x
                for x in runs
                if x["system"] == reference and (x["qps"], x["slo_scale"], x.get("replicas", 1)) == same
            ),
            None,
        )
        if ref is not None and ref["slo_satisfaction"] < r["slo_satisfaction"]:
            lines.append(
                f"- {r.get('replicas', 1)} replica(s), {r['qps']:g} req/s: {reference} "
                f"{ref['slo_satisfaction']:.4f} < {r['system']} {r['slo_satisfaction']:.4f}"
            )
    return lines or [f"- none: {reference} is at or above every other system at every point"]


def report_lines(data: dict[str, Any], reference: str = "patchedserve") -> list[str]:
    """The whole report; ratios and shortfalls are taken against ``reference``."""
    runs = data["runs"]
    if not any(r["system"] == reference for r in runs):
        names = sorted({r["system"] for r in runs})
        raise ValueError(f"no runs of {reference!r} in these results; they hold {', '.join(names)}")
    goodput = data["goodput_at_90"]
    if goodput.get("reference") != reference:
        goodput = goodput_at_target(runs, reference, goodput.get("target", 0.9))
    return [
        *satisfaction_matrix(runs),
        *run_table(runs),
        "",
        *goodput_table(goodput),
        "",
        f"Points where {reference}'s SLO satisfaction is below another system's:",
        "",
        *shortfalls(runs, reference),
    ]
