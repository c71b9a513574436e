"""PNG plots of a ``results.json``: SLO satisfaction and goodput against QPS, latency CDFs.

One panel per (replicas, SLO scale) found in the runs, one line per system. Uses matplotlib's Agg
backend (no display). Called by ``bench.results.write_results`` for real and simulated runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes

from patchedserve.bench.systems import SYSTEMS

Run = dict[str, Any]
Panel = tuple[int, float]
"""(replicas, slo_scale)."""


def _panels(runs: Sequence[Run]) -> list[Panel]:
    return sorted({(int(r.get("replicas", 1)), float(r["slo_scale"])) for r in runs})


def _systems(runs: Sequence[Run]) -> list[str]:
    order = {name: i for i, name in enumerate(SYSTEMS)}
    return sorted({r["system"] for r in runs}, key=lambda s: (order.get(s, len(order)), s))


def _title(panel: Panel, multi_replica: bool) -> str:
    replicas, scale = panel
    prefix = f"{replicas} replica{'s' if replicas > 1 else ''}, " if multi_replica else ""
    return f"{prefix}SLO {scale:g}x"


def _grid(count: int) -> tuple[Any, list[Axes]]:
    cols = min(count, 4)
    rows = -(-count // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax in flat[count:]:
        ax.set_visible(False)
    return fig, flat[:count]


def plot_metric_vs_qps(runs: Sequence[Run], key: str, label: str, path: Path) -> Path:
    """``key`` of each run against its QPS, one line per system, one panel per (replicas, scale)."""
    panels = _panels(runs)
    fig, axes = _grid(len(panels))
    multi = len({p[0] for p in panels}) > 1 or panels[0][0] > 1
    for ax, panel in zip(axes, panels, strict=True):
        for system in _systems(runs):
            pts = sorted(
                (r["qps"], r[key])
                for r in runs
                if r["system"] == system
                and r[key] is not None
                and (int(r.get("replicas", 1)), float(r["slo_scale"])) == panel
            )
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=system)
        ax.set_title(_title(panel, multi))
        ax.set_xlabel("offered load (requests/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if key == "slo_satisfaction":
            ax.set_ylim(-0.02, 1.02)
            ax.axhline(0.9, color="grey", lw=0.8, ls="--")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_latency_cdf(runs: Sequence[Run], path: Path) -> Path:
    """CDF of finished requests' latency per system at each QPS of the first (replicas, scale)."""
    panel = _panels(runs)[0]
    selected = [r for r in runs if (int(r.get("replicas", 1)), float(r["slo_scale"])) == panel]
    qps_values = sorted({r["qps"] for r in selected})
    fig, axes = _grid(len(qps_values))
    for ax, qps in zip(axes, qps_values, strict=True):
        for system in _systems(selected):
            run = next((r for r in selected if r["system"] == system and r["qps"] == qps), None)
            latencies = sorted(run.get("latencies_s", [])) if run else []
            if latencies:
                # The CDF is over all requests of the run: unfinished ones never reach 1.
                share = np.arange(1, len(latencies) + 1) / max(run["requests"], 1)  # type: ignore[index]
                ax.step(latencies, share, where="post", label=system)
        ax.set_title(f"{qps:g} req/s, {_title(panel, panel[0] > 1)}")
        ax.set_xlabel("latency (s)")
        ax.set_ylabel("share of requests finished")
        ax.set_ylim(0.0, 1.02)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_all(runs: Sequence[Run], out_dir: Path) -> list[Path]:
    """The three plots into ``out_dir``; returns their paths."""
    if not runs:
        return []
    return [
        plot_metric_vs_qps(runs, "slo_satisfaction", "SLO satisfaction", out_dir / "slo_vs_qps.png"),
        plot_metric_vs_qps(
            runs, "goodput_rps", "goodput (requests/s in SLO)", out_dir / "goodput_vs_qps.png"
        ),
        plot_latency_cdf(runs, out_dir / "latency_cdf.png"),
    ]
