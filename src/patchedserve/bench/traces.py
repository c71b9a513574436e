"""Benchmark traces: who asks for what, when. Built from a seed, saved as JSONL, replayed exactly.

``make_trace(TraceConfig(...))`` draws arrivals (Poisson, or gamma with a burstiness knob), a size
per request from a resolution mix, step counts, SLO multipliers and prompts from the built-in set
(``bench.prompts``) with a repetition knob. ``save_trace``/``load_trace`` write and read JSONL: a
header line with the config, then one request per line. Used by the real replay (``bench slo``)
and the simulator (``patchedserve simulate``), which replay the same file on every system.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from patchedserve.bench.prompts import PROMPTS, fresh_prompt
from patchedserve.errors import InvalidRequestError

FORMAT = "patchedserve-trace"
"""Value of the header line's ``format`` key."""
VERSION = 1
"""Trace file layout version."""
MAX_TRACE_REQUESTS = 1_000_000
"""Most requests a generated trace may hold (qps x duration): more would exhaust memory before any
replay or simulation could use them."""
MIXES: tuple[str, ...] = ("uniform", "skewed", "custom")
"""Resolution mixes: equal shares, 50/25/25 (first size half, the rest share the other half), or
``weights`` given explicitly."""
ARRIVALS: tuple[str, ...] = ("poisson", "gamma")
"""Arrival processes."""


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace."""

    arrival_s: float
    """Seconds from the start of the trace."""
    prompt: str
    """Text prompt."""
    width: int
    """Image width in pixels."""
    height: int
    """Image height in pixels."""
    steps: int
    """Denoising steps."""
    guidance_scale: float
    """Classifier-free guidance scale (> 1 runs both branches)."""
    seed: int
    """Seed of the initial noise."""
    slo_scale: float
    """Deadline = arrival + slo_scale x the request's standalone latency (from the shared profile)."""
    sampler: str = "euler"
    """Sampler name (euler: single-step, so NIRVANA's cache can resume mid-trajectory)."""

    @property
    def size(self) -> str:
        """``"WxH"``, the key of per-resolution figures."""
        return f"{self.width}x{self.height}"


@dataclass(frozen=True)
class TraceConfig:
    """How ``make_trace`` draws a trace."""

    qps: float = 0.5
    """Mean arrival rate, requests per second."""
    duration_s: float = 60.0
    """Arrivals are drawn in [0, duration_s)."""
    arrivals: str = "poisson"
    """``poisson`` (exponential gaps) or ``gamma`` (gamma gaps with coefficient of variation
    ``burstiness``)."""
    burstiness: float = 1.0
    """Coefficient of variation of the gaps for ``gamma`` (1 = Poisson, > 1 = burstier)."""
    mix: str = "uniform"
    """Resolution mix: ``uniform``, ``skewed`` (50/25/25) or ``custom`` (``weights``)."""
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 256), (512, 512))
    """(width, height) in pixels of the requests, in the order the mix's weights refer to."""
    weights: tuple[float, ...] | None = None
    """Relative share of each size for ``mix="custom"``."""
    slo_scales: tuple[float, ...] = (5.0,)
    """SLO multipliers, drawn uniformly per request (e.g. (3, 5, 10) for the sensitivity study)."""
    steps: tuple[int, ...] = (8,)
    """Step counts, drawn uniformly per request (one value: every request the same)."""
    guidance_scale: float = 5.0
    """CFG scale of every request."""
    sampler: str = "euler"
    """Sampler of every request."""
    repetition: float = 0.0
    """Probability that a request reuses the prompt of an earlier request (chosen uniformly)."""
    seed: int = 0
    """Seed of every draw."""

    def __post_init__(self) -> None:
        if not 0.0 < self.qps < math.inf or not 0.0 < self.duration_s < math.inf:
            got = f"{self.qps}, {self.duration_s}"
            raise ValueError(f"qps and duration_s must be positive and finite; got {got}")
        if self.qps * self.duration_s > MAX_TRACE_REQUESTS:
            raise ValueError(
                f"qps x duration_s asks for {self.qps * self.duration_s:.3g} requests; a trace holds at most "
                f"{MAX_TRACE_REQUESTS:,}"
            )
        if self.arrivals not in ARRIVALS or self.mix not in MIXES:
            raise ValueError(f"arrivals must be one of {ARRIVALS} and mix one of {MIXES}")
        if not self.burstiness > 0.0 or not 0.0 <= self.repetition <= 1.0:
            raise ValueError("burstiness must be positive and repetition in [0, 1]")
        if not self.sizes or not self.slo_scales or not self.steps:
            raise ValueError("sizes, slo_scales and steps need at least one value each")
        if self.mix == "custom" and (self.weights is None or len(self.weights) != len(self.sizes)):
            raise ValueError("mix custom needs one weight per size")
        if self.mix == "custom" and (min(self.weights or (0.0,)) < 0.0 or sum(self.weights or ()) <= 0.0):
            raise ValueError("weights must be non-negative with a positive sum")

    def size_shares(self) -> np.ndarray:  # [len(sizes)]
        """Probability of each size under the mix."""
        n = len(self.sizes)
        if self.mix == "uniform":
            shares = np.ones(n)
        elif self.mix == "skewed":
            shares = np.array([0.5] + [0.5 / (n - 1)] * (n - 1)) if n > 1 else np.ones(1)
        else:
            shares = np.asarray(self.weights, dtype=float)
        return shares / shares.sum()


def arrival_times(config: TraceConfig, rng: np.random.Generator) -> np.ndarray:  # [N] seconds
    """Arrival instants in [0, duration_s): gaps of mean 1/qps, exponential or gamma."""
    mean_gap_s = 1.0 / config.qps
    expected = config.qps * config.duration_s
    times: list[float] = []
    t = 0.0
    while True:
        chunk = max(16, int(expected - len(times) + 4 * np.sqrt(expected) + 16))
        if config.arrivals == "poisson":
            gaps = rng.exponential(mean_gap_s, chunk)
        else:
            shape = 1.0 / config.burstiness**2  # CV of a gamma = 1/sqrt(shape)
            gaps = rng.gamma(shape, mean_gap_s / shape, chunk)
        for gap in gaps:
            t += float(gap)
            if t >= config.duration_s:
                return np.asarray(times)
            times.append(t)


def make_trace(config: TraceConfig) -> list[TraceRequest]:
    """Draws a trace; the same config (seed included) always gives the same trace."""
    rng = np.random.default_rng(config.seed)
    times = arrival_times(config, rng)
    n = len(times)
    size_index = rng.choice(len(config.sizes), size=n, p=config.size_shares())
    steps = rng.choice(np.asarray(config.steps), size=n)
    slo_scales = rng.choice(np.asarray(config.slo_scales, dtype=float), size=n)
    seeds = rng.integers(0, 2**31 - 1, size=n)
    prompts = draw_prompts(n, config.repetition, rng)
    return [
        TraceRequest(
            arrival_s=float(times[i]),
            prompt=prompts[i],
            width=config.sizes[size_index[i]][0],
            height=config.sizes[size_index[i]][1],
            steps=int(steps[i]),
            guidance_scale=config.guidance_scale,
            seed=int(seeds[i]),
            slo_scale=float(slo_scales[i]),
            sampler=config.sampler,
        )
        for i in range(n)
    ]


def draw_prompts(n: int, repetition: float, rng: np.random.Generator) -> list[str]:
    """``n`` prompts: each reuses an earlier one with probability ``repetition``, else is new."""
    order = [int(i) for i in rng.permutation(len(PROMPTS))]
    reuse = rng.random(n) < repetition  # [N]
    prompts: list[str] = []
    fresh = 0
    for i in range(n):
        if reuse[i] and prompts:
            prompts.append(prompts[int(rng.integers(len(prompts)))])
        else:
            prompts.append(fresh_prompt(fresh, order))
            fresh += 1
    return prompts


def save_trace(path: str | Path, requests: Sequence[TraceRequest], config: TraceConfig | None = None) -> Path:
    """Writes the header (format, version, config) and one JSON line per request."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    header: dict[str, Any] = {"format": FORMAT, "version": VERSION, "config": None}
    if config is not None:
        header["config"] = asdict(config)
    lines = [json.dumps(header)] + [json.dumps(asdict(r)) for r in requests]
    path.write_text("\n".join(lines) + "\n")
    return path


def load_trace(path: str | Path) -> tuple[list[TraceRequest], TraceConfig | None]:
    """Reads a file written by ``save_trace``: the requests and the config (None if not stored)."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    if not lines:
        raise InvalidRequestError(f"trace {path} is empty", field="trace")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError as err:
        raise InvalidRequestError(f"{path} is not a trace file (JSON lines): {err}", field="trace") from err
    if not isinstance(header, dict) or header.get("format") != FORMAT or header.get("version") != VERSION:
        raise InvalidRequestError(f"{path} is not a {FORMAT} version {VERSION} file", field="trace")
    config = None
    if header.get("config") is not None:
        config = config_from_dict(header["config"])
    known = {f.name for f in fields(TraceRequest)}
    requests = []
    for number, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            requests.append(TraceRequest(**{k: v for k, v in row.items() if k in known}))
        except (json.JSONDecodeError, TypeError, AttributeError) as err:  # not JSON, an object, its keys
            message = f"{path} line {number} is not a trace request: {err}"
            raise InvalidRequestError(message, field="trace") from err
    return requests, config


def config_from_dict(data: dict[str, Any]) -> TraceConfig:
    """A ``TraceConfig`` from its ``asdict`` form (lists back to tuples)."""
    data = dict(data)
    data["sizes"] = tuple(tuple(s) for s in data["sizes"])
    for key in ("slo_scales", "steps", "weights"):
        if data.get(key) is not None:
            data[key] = tuple(data[key])
    return TraceConfig(**data)
