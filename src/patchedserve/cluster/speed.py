"""Machine speed over time, read off a real run's steps: for a simulator that faces the same machine.

On a shared machine other processes slow every step by a factor that drifts over minutes (tens
of percent here). A real replay logs each step (start, latency, active set; ``bench.replay``);
``SpeedTrace.from_steps`` divides, per time bucket, the observed step time by what the cost model
says those steps cost (a ratio of sums: the bucket's throughput, so slow steps, e.g. those
overlapping a decode, weigh as much as they cost). Given to the cost model (``CostModel.speed``),
the simulated machine is then as slow as the real one was at the same trace time: what remains
of a real/simulated difference is the simulator's own (policy, batching, queueing), not the
neighbours'.

The decode worker slows the steps it overlaps (``CostModel.decode_interference``). Given when the
worker was busy (``decoding``: each finished request's decode phase, from its outcome), a step's
observed time is taken net of that first: a share ``overlap`` of it at ``1 - interference`` of the
speed did the work of ``latency x (1 - interference x overlap)`` at full speed. The factors are
then the machine's alone, the simulator adds the interference where its own decodes run, and the
decodes themselves are priced at that speed. Without ``decoding`` (a log whose outcomes lack decode
phases, or Ray replicas, whose decodes slow each other's steps across engines) the interference
is left inside the factors (``decode_interference`` None: the simulator must not add it again).
On session 24's runs the steps that overlapped no decode ran at 0.95-0.99 of the profile's time
and those wholly inside one at 1.45-1.60, where an interference of 0.36 predicts 1.56; the
factors with the interference inside (1.1-1.2) priced every decode that much too slow.

What the buckets average away, each step's own deviation, is measured too (``noise``) and can
be replayed as random per-step jitter (``simulate --step-noise measured``). So is the time the
loop spends admitting a request before the step it joins (``admission_s``: prompt encoding and
preparation), read off the gaps between steps: in the engine it took about twice the profile's
``encode_s`` (session 16). Of the outcomes only the decode phases enter, never whether a request
met its deadline. Used by ``simulate --compare --speed-trace``.
"""

from __future__ import annotations

import bisect
import itertools
import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from patchedserve.bench.metrics import RequestOutcome
from patchedserve.bench.results import StepRecord
from patchedserve.cluster.costs import CostModel
from patchedserve.scheduler import Entry


@dataclass(frozen=True)
class SpeedTrace:
    """Cost factor per time bucket: observed / modelled step time (sums over the bucket's steps)."""

    bucket_s: float
    """Bucket width in seconds."""
    factors: tuple[float, ...]
    """One factor per bucket from t = 0; empty buckets take the nearest earlier (else later) one."""
    noise: float = 0.0
    """Standard deviation of log(observed / (modelled x bucket factor)) over the steps, each step
    weighted by its modelled time: the step-to-step jitter the buckets average away
    (``CostModel.step_noise``)."""
    admission_s: float | None = None
    """Median seconds the loop spent per admitted request between a step and the next one that
    the request joined (``admission_gap_s``); None where the log shows no such step
    (``CostModel.admission_s``)."""
    decode_interference: float | None = None
    """The decode worker's interference the factors are net of (``CostModel.decode_interference``,
    for the simulator to add where its decodes run); None: the factors include it."""

    def __call__(self, now_s: float) -> float:
        if not self.factors:
            return 1.0
        index = min(max(int(now_s // self.bucket_s), 0), len(self.factors) - 1)
        return self.factors[index]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.factors) if self.factors else 1.0

    @classmethod
    def from_steps(
        cls,
        steps: Sequence[StepRecord],
        cost: CostModel,
        bucket_s: float = 5.0,
        progress: Sequence[Sequence[tuple[int, int]]] | None = None,
        ids: Sequence[Sequence[int]] | None = None,
        replica: Sequence[int] | None = None,
        decoding: Sequence[tuple[float, float]] | None = None,
    ) -> SpeedTrace:
        """Factors of ``steps`` against ``cost`` (taken at factor 1, with its patch cache: what the
        simulator charges for the same step at speed 1), bucketed by start time. ``progress``: per
        step, each entry's (step index, steps) (logged, or ``infer_progress``), which the patch
        cache's per-step profile needs; ``ids``: per step, its requests' ids, where logged
        (``admission_gap_s``); ``replica``: per step, which replica of a Ray group ran it (the
        replicas share the machine, so one factor per bucket prices all of them; admission gaps
        are taken within each replica's own steps); ``decoding``: (start, end) of each decode on
        the engine's worker, in step-log time, to take the steps net of the worker's
        ``cost.decode_interference`` (see the module docstring)."""
        busy = Busy(decoding) if decoding is not None else None
        interference = cost.decode_interference if busy is not None else 0.0
        buckets: dict[int, list[tuple[float, float]]] = {}  # bucket -> [(observed s, modelled s)]
        for i, (start_s, latency_s, entries) in enumerate(steps):
            cache = cost.cache_multiplier(entries, progress[i] if progress is not None else None)
            modelled_s = cost.base_step_s(entries) * cost.scale * cache
            if busy is not None and latency_s > 0.0:
                latency_s -= interference * busy.overlap_s(start_s, start_s + latency_s)
            if modelled_s > 0.0 and latency_s > 0.0:
                buckets.setdefault(max(int(start_s // bucket_s), 0), []).append((latency_s, modelled_s))
        admission_s = _admission_gap_per_replica(steps, ids, replica)
        net_of = interference if busy is not None else None
        if not buckets:
            return cls(bucket_s, (), admission_s=admission_s, decode_interference=net_of)
        factors: list[float | None] = [None] * (max(buckets) + 1)
        for index, pairs in buckets.items():
            factors[index] = sum(o for o, _ in pairs) / sum(m for _, m in pairs)
        first = next(f for f in factors if f is not None)
        filled, last = [], first
        for f in factors:
            last = f if f is not None else last
            filled.append(last)
        residuals = [
            (math.log(o / (m * filled[index])), m * filled[index])
            for index, pairs in buckets.items()
            for o, m in pairs
        ]
        return cls(bucket_s, tuple(filled), _weighted_std(residuals), admission_s, net_of)


def decode_phases(outcomes: Sequence[RequestOutcome]) -> list[tuple[float, float]]:
    """(end of denoising, image ready) of each finished request, in trace time: when the decode
    worker was busy (a phase includes the wait behind another decode, which the union absorbs)."""
    return [
        (o.arrival_s + o.denoised_s, o.arrival_s + o.latency_s)
        for o in outcomes
        if o.status == "finished" and o.denoised_s is not None and o.latency_s is not None
    ]


class Busy:
    """The union of (start, end) intervals, and how much of a span it covers."""

    def __init__(self, intervals: Sequence[tuple[float, float]]) -> None:
        merged: list[list[float]] = []
        for a, b in sorted((a, b) for a, b in intervals if b > a):
            if merged and a <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], b)
            else:
                merged.append([a, b])
        self.starts = [a for a, _ in merged]
        self.spans = merged

    def overlap_s(self, start_s: float, end_s: float) -> float:
        """Seconds of [start_s, end_s] inside the union."""
        i = max(bisect.bisect_right(self.starts, start_s) - 1, 0)
        total = 0.0
        for a, b in self.spans[i:]:
            if a >= end_s:
                break
            total += max(0.0, min(b, end_s) - max(a, start_s))
        return total


ADMISSION_GAP_LIMIT_S = 0.5
"""Longer gaps between steps are not admission work: the loop idled or decoded inline."""


def admission_gap_s(steps: Sequence[StepRecord], ids: Sequence[Sequence[int]] | None = None) -> float | None:
    """Median gap per newcomer before the steps that only added requests to the previous step's.

    The loop admits (encodes prompts, prepares noise) between two steps, and a step log's gaps
    show it: ``start - (previous start + latency)``. Only steps whose requests are the previous
    step's plus others count, so no retirement (latent copy, inline decode) is in the gap. With
    ``ids`` (each step's request ids) a newcomer is a request never seen before, so one that
    returns from a pause (``SchedulerOutput.paused``) is not; without them newcomers are read off
    the sizes, and a request that left while another of its size joined hides there (hence the
    median).
    """
    per_request = []
    seen: set[int] = set()
    for i, ((start_a, latency_a, entries_a), (start_b, _, entries_b)) in enumerate(itertools.pairwise(steps)):
        if ids is not None:
            seen.update(ids[i])
            before_ids, after_ids = set(ids[i]), set(ids[i + 1])
            joined = len(after_ids - seen)
            pure = before_ids <= after_ids
        else:
            before, after = Counter(entries_a), Counter(entries_b)
            joined = sum((after - before).values())
            pure = not before - after
        gap_s = start_b - (start_a + latency_a)
        if joined and pure and 0.0 <= gap_s < ADMISSION_GAP_LIMIT_S:
            per_request.append(gap_s / joined)
    return statistics.median(per_request) if per_request else None


def _admission_gap_per_replica(
    steps: Sequence[StepRecord], ids: Sequence[Sequence[int]] | None, replica: Sequence[int] | None
) -> float | None:
    """``admission_gap_s`` of one engine's steps; of a replica group's, the median of each
    replica's (its loop's gaps are between its own steps)."""
    if replica is None:
        return admission_gap_s(steps, ids)
    gaps = []
    for index in sorted(set(replica)):
        mine = [i for i, r in enumerate(replica) if r == index]
        gap = admission_gap_s([steps[i] for i in mine], None if ids is None else [ids[i] for i in mine])
        if gap is not None:
            gaps.append(gap)
    return statistics.median(gaps) if gaps else None


def _weighted_std(samples: Sequence[tuple[float, float]]) -> float:
    """Standard deviation of the values of (value, weight) pairs, each weighing its weight: a step's
    jitter counts as much as the time it costs, so the many cheap steps of a patch-cached run (whose
    relative deviations are large but whose seconds are few) do not inflate the jitter replayed on
    every step."""
    total = sum(w for _, w in samples)
    if len(samples) < 2 or total <= 0.0:
        return 0.0
    mean = sum(v * w for v, w in samples) / total
    return math.sqrt(sum(w * (v - mean) ** 2 for v, w in samples) / total)


def infer_progress(steps: Sequence[StepRecord], trajectory: int) -> list[list[tuple[int, int]]] | None:
    """Each logged entry's (step index, ``trajectory``), for a run whose requests all take
    ``trajectory`` steps; None where the log does not fit that.

    A step log lists the running requests in admission order: a request runs every step from its
    admission to its last, so each step's list is the previous one without the requests that just
    took their last step, followed by the newcomers. Requests that start mid-trajectory (a NIRVANA
    hit), pauses, or a log that starts mid-run break the pattern, which is checked entry by entry.
    Logs since session 17 carry each request's step index (``load_step_progress``) instead.
    """
    out: list[list[tuple[int, int]]] = []
    previous: list[tuple[Entry, int]] = []
    for _, _, entries in steps:
        kept = [(e, k + 1) for e, k in previous if k + 1 < trajectory]
        if len(entries) < len(kept) or any(entries[i] != e for i, (e, _) in enumerate(kept)):
            return None
        previous = kept + [(e, 0) for e in entries[len(kept) :]]
        out.append([(k, trajectory) for _, k in previous])
    return out
