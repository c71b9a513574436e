"""Serving figures from per-request outcomes: SLO satisfaction, goodput, latency percentiles.

The real replay and the simulator both reduce a run to a list of ``RequestOutcome`` and call
``summarize``, so their figures are computed by the same code. Definitions (per run, over the
requests of the trace, which all arrive):

* SLO satisfaction = requests finished by their deadline / requests that arrived;
* goodput = requests finished by their deadline / trace duration (requests per second);
* latency percentiles (P50/P90/P99) over the *finished* requests only, late ones included;
* decode phase P50 = median over finished requests of end of denoising to image ready (the wait
  for the decode worker plus the decode): the part of a latency the simulator's decode model
  must reproduce;
* drop rate = requests refused (by the policy, or a full queue) / requests that arrived;
* unfinished rate = requests still queued or running when the run stopped (after every deadline
  of the trace had passed; they would have missed anyway).

``qps_at_satisfaction`` reads the highest load a system sustains at a satisfaction target off a
QPS sweep (the "goodput at 90% SLO satisfaction" of the paper).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STATUSES: tuple[str, ...] = ("finished", "dropped", "rejected", "cancelled", "failed")
"""Final states of a request in a run: done, refused by the policy, refused by a full queue,
stopped at the end of the run, failed."""


@dataclass(frozen=True)
class RequestOutcome:
    """What happened to one trace request on one system."""

    index: int
    """Position in the trace."""
    size: str
    """``"WxH"`` in pixels."""
    arrival_s: float
    """Arrival, seconds from the start of the trace."""
    status: str
    """One of ``STATUSES``."""
    latency_s: float | None
    """Arrival to image ready (finished requests), else None."""
    slo_s: float
    """The request's objective: deadline - arrival, seconds."""
    denoised_s: float | None = None
    """Arrival to its last denoising step's end (finished requests), else None; ``latency_s`` minus
    this is the wait for the decode worker plus the decode."""

    @property
    def met(self) -> bool:
        """Finished within its objective."""
        return self.status == "finished" and self.latency_s is not None and self.latency_s <= self.slo_s


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (linear interpolation), None without values."""
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else None


def summarize(outcomes: Sequence[RequestOutcome], duration_s: float) -> dict[str, Any]:
    """The figures of one run (or one resolution of it); see the module docstring."""
    n = len(outcomes)
    met = sum(o.met for o in outcomes)
    latencies = [o.latency_s for o in outcomes if o.status == "finished" and o.latency_s is not None]
    decodes = [
        o.latency_s - o.denoised_s
        for o in outcomes
        if o.status == "finished" and o.latency_s is not None and o.denoised_s is not None
    ]
    counts = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    share = (lambda k: k / n) if n else (lambda k: 0.0)
    return {
        "requests": n,
        "finished": counts["finished"],
        "met": met,
        "slo_satisfaction": share(met) if n else None,
        "goodput_rps": met / duration_s,
        "p50_s": percentile(latencies, 50),
        "p90_s": percentile(latencies, 90),
        "p99_s": percentile(latencies, 99),
        "decode_p50_s": percentile(decodes, 50),
        "drop_rate": share(counts["dropped"] + counts["rejected"]),
        "unfinished_rate": share(counts["cancelled"]),
        "failed": counts["failed"],
    }


def summarize_run(
    system: str, qps: float, slo_scale: float, outcomes: Sequence[RequestOutcome], duration_s: float
) -> dict[str, Any]:
    """One entry of ``results.json``'s ``runs``: the figures overall and per resolution."""
    sizes = sorted({o.size for o in outcomes}, key=_pixels)
    per_resolution = {size: summarize([o for o in outcomes if o.size == size], duration_s) for size in sizes}
    return {
        "system": system,
        "qps": qps,
        "slo_scale": slo_scale,
        **summarize(outcomes, duration_s),
        "per_resolution": per_resolution,
    }


def _pixels(size: str) -> int:
    w, h = (int(v) for v in size.split("x"))
    return w * h


def qps_at_satisfaction(points: Iterable[tuple[float, float]], target: float = 0.9) -> dict[str, Any]:
    """Highest offered QPS at which satisfaction >= ``target``, read off a sweep.

    Points are (qps, satisfaction). Take the highest sweep point at or above the target; if a
    higher point falls below it, interpolate linearly between the two to the crossing. So the
    value is where the sweep curve last crosses the target going up in load.

    Returns:
        ``{"qps": value or None, "bound": "exact" | "at_least" | "below_sweep"}``: ``at_least`` when
        even the highest point meets the target (the true value is higher), ``below_sweep`` (qps
        None) when no point does.
    """
    pts = sorted(points)
    above = [i for i, (_, s) in enumerate(pts) if s >= target]
    if not above:
        return {"qps": None, "bound": "below_sweep"}
    i = above[-1]
    if i == len(pts) - 1:
        return {"qps": pts[i][0], "bound": "at_least"}
    (q0, s0), (q1, s1) = pts[i], pts[i + 1]
    return {"qps": q0 + (s0 - target) / (s0 - s1) * (q1 - q0), "bound": "exact"}


def goodput_at_target(
    runs: Sequence[dict[str, Any]], reference: str = "patchedserve", target: float = 0.9
) -> dict[str, Any]:
    """Per system, SLO scale and replica count: ``qps_at_satisfaction`` and the ratio
    ``reference`` / system (keys ``"system@5x"``, or ``"system@5x/4r"`` for 4 replicas)."""
    groups: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in runs:
        replicas = int(r.get("replicas", 1))
        setting = f"{r['slo_scale']:g}x" + (f"/{replicas}r" if replicas > 1 else "")
        if r["slo_satisfaction"] is not None:
            groups.setdefault((r["system"], setting), []).append((r["qps"], r["slo_satisfaction"]))
    systems = {
        f"{system}@{setting}": qps_at_satisfaction(points, target)
        for (system, setting), points in sorted(groups.items())
    }
    for key, value in systems.items():
        ref = systems.get(f"{reference}@{key.split('@', 1)[1]}")
        value["ratio"] = None
        if ref is not None and ref["qps"] is not None and value["qps"]:
            value["ratio"] = ref["qps"] / value["qps"]
    return {"target": target, "reference": reference, "systems": systems}
