"""Benchmark traces: arrival processes, resolution mixes, repetition, JSONL round trip, determinism."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from patchedserve.bench.traces import TraceConfig, load_trace, make_trace, save_trace
from patchedserve.errors import InvalidRequestError

SIZES = ((256, 256), (512, 256), (512, 512))


def gaps(config: TraceConfig) -> np.ndarray:
    times = np.array([r.arrival_s for r in make_trace(config)])
    return np.diff(times)


def test_poisson_rate_and_exponential_gaps() -> None:
    config = TraceConfig(qps=2.0, duration_s=2000.0, seed=1)
    trace = make_trace(config)
    assert abs(len(trace) / config.duration_s - 2.0) < 0.1  # 4000 expected, sd 63
    g = gaps(config)
    assert abs(g.mean() - 0.5) < 0.02
    assert abs(g.std() / g.mean() - 1.0) < 0.05  # exponential: CV 1
    assert all(0.0 <= r.arrival_s < config.duration_s for r in trace)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_burstiness_sets_the_gap_cv_at_the_same_rate(cv: float) -> None:
    config = TraceConfig(qps=1.0, duration_s=5000.0, arrivals="gamma", burstiness=cv, seed=2)
    g = gaps(config)
    assert abs(g.mean() - 1.0) < 0.1
    assert abs(g.std() / g.mean() - cv) < 0.15 * cv


@pytest.mark.parametrize(
    ("mix", "weights", "expected"),
    [
        ("uniform", None, (1 / 3, 1 / 3, 1 / 3)),
        ("skewed", None, (0.5, 0.25, 0.25)),
        ("custom", (1.0, 0.0, 3.0), (0.25, 0.0, 0.75)),
    ],
)
def test_resolution_mix_proportions(
    mix: str, weights: tuple[float, ...] | None, expected: tuple[float, ...]
) -> None:
    trace = make_trace(TraceConfig(qps=5.0, duration_s=1000.0, mix=mix, weights=weights, sizes=SIZES))
    counts = Counter((r.width, r.height) for r in trace)
    for size, share in zip(SIZES, expected, strict=True):
        assert abs(counts[size] / len(trace) - share) < 0.02


def test_repetition_controls_prompt_reuse() -> None:
    def reused_share(p: float) -> float:
        trace = make_trace(TraceConfig(qps=5.0, duration_s=400.0, repetition=p, seed=3))
        seen: set[str] = set()
        reused = 0
        for r in trace:
            reused += r.prompt in seen
            seen.add(r.prompt)
        return reused / len(trace)

    assert reused_share(0.0) == 0.0  # fresh prompts never repeat (subjects x styles)
    assert abs(reused_share(0.3) - 0.3) < 0.04
    assert abs(reused_share(0.8) - 0.8) < 0.04


def test_steps_and_slo_scales_are_drawn_from_their_lists() -> None:
    trace = make_trace(TraceConfig(qps=5.0, duration_s=200.0, steps=(4, 8), slo_scales=(3.0, 5.0, 10.0)))
    assert {r.steps for r in trace} == {4, 8}
    assert {r.slo_scale for r in trace} == {3.0, 5.0, 10.0}
    assert all(r.sampler == "euler" and r.guidance_scale == 5.0 for r in trace)


def test_same_seed_same_trace_other_seed_other_trace() -> None:
    config = TraceConfig(qps=1.0, duration_s=100.0, repetition=0.3, seed=7)
    assert make_trace(config) == make_trace(config)
    assert make_trace(config) != make_trace(replace(config, seed=8))


def test_jsonl_round_trip_keeps_requests_and_config(tmp_path: Path) -> None:
    config = TraceConfig(qps=0.7, duration_s=50.0, mix="custom", weights=(1.0, 2.0, 3.0), steps=(6, 9))
    trace = make_trace(config)
    path = save_trace(tmp_path / "t.jsonl", trace, config)
    requests, loaded = load_trace(path)
    assert requests == trace
    assert loaded == config
    assert len(path.read_text().splitlines()) == len(trace) + 1


HEADER = '{"format": "patchedserve-trace", "version": 1}\n'
"""A trace file's first line, without a config."""


def test_bad_configs_are_refused() -> None:
    with pytest.raises(ValueError):
        TraceConfig(qps=0.0)
    with pytest.raises(ValueError):
        TraceConfig(mix="custom")
    with pytest.raises(ValueError):
        TraceConfig(repetition=1.5)
    with pytest.raises(ValueError, match="finite"):
        TraceConfig(qps=float("inf"))
    with pytest.raises(ValueError, match="at most 1,000,000"):
        TraceConfig(qps=1e9, duration_s=60.0)  # would be generated until memory ran out


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("not json\n", "is not a trace file (JSON lines)"),
        ('{"format": "other"}\n', "is not a patchedserve-trace version"),
        ("[1, 2]\n", "is not a patchedserve-trace version"),
        (HEADER + '{"arrival_s": 0.0,\n', "line 2 is not a trace request"),  # cut short
        (HEADER + '{"arrival_s": 0.0}\n', "line 2 is not a trace request"),  # fields missing
        (HEADER + "[1]\n", "line 2 is not a trace request"),
    ],
)
def test_a_file_that_is_not_a_trace_is_refused_by_name(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text(text)
    with pytest.raises(InvalidRequestError) as err:
        load_trace(path)
    assert message in str(err.value) and str(path) in str(err.value) and err.value.field == "trace"
