"""Real replay: a trace submitted to a real engine on the wall clock, one system at a time.

Each request is submitted at its arrival instant with ``slo_ms`` set to its objective (so every
system is held to the same deadlines); the engine's background loop serves them. The run ends
when every request reached a final state, or when the last deadline of the trace has passed:
what is still queued or running then is cancelled (it would miss anyway) and counted as
unfinished. Every executed step is logged with its active set (``StepLog``), so the machine's
speed during the run can be read off afterwards (``cluster.speed``). Called by ``bench slo``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from tqdm import tqdm

from patchedserve.bench.metrics import RequestOutcome
from patchedserve.bench.results import StepProgress, StepRecord
from patchedserve.bench.systems import SystemSpec, engine_config
from patchedserve.bench.traces import TraceRequest
from patchedserve.engine import Engine, GenerationResult, QueueFullError
from patchedserve.models import ModelBundle
from patchedserve.request import GenerationRequest, Request, RequestStatus
from patchedserve.scheduler import StepOutcome, entry_of

POLL_S = 0.02
"""How often the replay loop wakes to submit, update the progress bar and check the end."""


@dataclass(frozen=True)
class ReplayConfig:
    """How every system's engine is built and driven."""

    profile: str
    """Latency profile shared by every system (deadlines and the ``slo`` policy's predictor)."""
    patch_size: int = 256
    """Patch side in pixels of the patched systems."""
    max_running: int = 12
    """Batch cap of the batching systems."""
    device: str = "cpu"
    """Torch device."""
    dtype: str = "float32"
    """Denoiser dtype."""
    progress: bool = True
    """Show a tqdm progress bar per run."""
    drain_timeout_s: float = 300.0
    """After the cut-off, how long to wait for the step and decodes in flight."""


def build_engine(bundle: ModelBundle, spec: SystemSpec, config: ReplayConfig) -> Engine:
    """A started engine of ``spec``, warmed up on ``warm_sizes`` by the caller."""
    econf = engine_config(
        spec, config.patch_size, config.profile, config.max_running, config.device, config.dtype
    )
    engine = Engine(bundle, econf)
    engine.start()
    return engine


def warm_up(engine: Engine, requests: Sequence[TraceRequest]) -> None:
    """One single-step request per size of the trace, together (builds kernels and layouts).

    One step never matches NIRVANA's cache points, so it seeds nothing a trace request could
    reuse; the predictor's online correction is reset afterwards so every run starts from the
    profile.
    """
    sizes = sorted({(r.width, r.height, r.guidance_scale, r.sampler) for r in requests})
    futures = [
        engine.submit(
            GenerationRequest("warm-up", width=w, height=h, steps=1, guidance_scale=g, sampler=s, slo_ms=1e9)
        )
        for w, h, g, s in sizes
    ]
    for f in futures:
        f.result()
    predictor = getattr(engine.scheduler, "predictor", None)  # QueueScheduler's; the interface has none
    if predictor is not None:
        predictor.log_correction = 0.0


class StepLog:
    """Records every step an engine executes: start (from ``start_s``), latency and the requests
    that took it (size, and id and step index).

    The engine reports each step to its scheduler's ``update_from_output`` with the requests that
    ran (``EngineObserver.on_step`` carries counts only), so the log wraps that method of this
    engine's scheduler instance; the policy itself is untouched.
    """

    def __init__(self, engine: Engine) -> None:
        self.records: list[StepRecord] = []
        self.progress: list[StepProgress] = []
        """Per record, each request's (id, step index taken): who stepped, where pauses show."""
        self.start_s = 0.0
        scheduler = engine.scheduler
        inner = scheduler.update_from_output

        def update_from_output(outcome: StepOutcome) -> list[Request]:
            start_s = outcome.now_s - outcome.latency_s - self.start_s
            self.records.append((start_s, outcome.latency_s, [entry_of(r) for r in outcome.running]))
            self.progress.append([(r.request_id, r.step_index - 1) for r in outcome.running])
            return inner(outcome)

        scheduler.update_from_output = update_from_output  # type: ignore[method-assign]

    def restart(self, start_s: float) -> None:
        """Forget what was logged (warm-up) and measure times from ``start_s``."""
        self.records.clear()
        self.progress.clear()
        self.start_s = start_s


def replay(
    engine: Engine,
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    config: ReplayConfig,
    desc: str = "",
    log: StepLog | None = None,
) -> list[RequestOutcome]:
    """Submits ``requests`` at their arrival instants; returns one outcome per request, in order."""
    futures: dict[int, Future[GenerationResult]] = {}
    rejected: set[int] = set()
    deadlines: list[float] = []
    bar = tqdm(total=len(requests), desc=desc, disable=not config.progress, leave=False, unit="req")
    start = engine.clock()
    if log is not None:
        log.restart(start)
    for i, (r, slo_s) in enumerate(zip(requests, objectives_s, strict=True)):
        while engine.clock() < start + r.arrival_s:
            time.sleep(min(POLL_S, max(start + r.arrival_s - engine.clock(), 0.0)))
            _update(bar, futures, rejected)
        gen = GenerationRequest(
            r.prompt,
            width=r.width,
            height=r.height,
            steps=r.steps,
            guidance_scale=r.guidance_scale,
            seed=r.seed,
            sampler=r.sampler,
            slo_ms=1000.0 * slo_s,
        )
        try:
            futures[i] = engine.submit(gen)
            deadlines.append(engine.clock() + slo_s)
        except QueueFullError:
            rejected.add(i)
    _finish(
        engine,
        futures,
        max(deadlines, default=engine.clock()),
        config.drain_timeout_s,
        lambda: _update(bar, futures, rejected),
    )
    _update(bar, futures, rejected)
    bar.close()
    return [
        _outcome(i, r, slo, futures.get(i))
        for i, (r, slo) in enumerate(zip(requests, objectives_s, strict=True))
    ]


def _finish(
    engine: Engine,
    futures: dict[int, Future[GenerationResult]],
    cutoff_s: float,
    drain_timeout_s: float,
    tick: Callable[[], None],
) -> None:
    """Waits for every request until ``cutoff_s`` (the last deadline), then cancels what is left and
    waits (at most ``drain_timeout_s``) for the step and decodes in flight."""
    while engine.clock() < cutoff_s and not all(f.done() for f in futures.values()):
        time.sleep(POLL_S)
        tick()
    for f in futures.values():
        if not f.done():
            engine.cancel(f.request_id)  # type: ignore[attr-defined]
    give_up = time.monotonic() + drain_timeout_s
    while time.monotonic() < give_up and not all(f.done() for f in futures.values()):
        time.sleep(POLL_S)


def _update(bar: tqdm[Any], futures: dict[int, Future[GenerationResult]], rejected: set[int]) -> None:
    done = len(rejected) + sum(f.done() for f in futures.values())
    if done > bar.n:
        bar.update(done - bar.n)


_STATUS = {
    RequestStatus.FINISHED: "finished",
    RequestStatus.DROPPED: "dropped",
    RequestStatus.CANCELLED: "cancelled",
    RequestStatus.FAILED: "failed",
}


def _outcome(
    i: int, r: TraceRequest, slo_s: float, future: Future[GenerationResult] | None
) -> RequestOutcome:
    if future is None:
        return RequestOutcome(i, r.size, r.arrival_s, "rejected", None, slo_s)
    if not future.done():
        return RequestOutcome(i, r.size, r.arrival_s, "cancelled", None, slo_s)
    result = future.result()
    status = _STATUS.get(result.status, "failed")
    finished = status == "finished"
    latency_s = result.timings.get("latency_s") if finished else None
    denoised_s = result.timings.get("denoise_done_s") if finished else None
    return RequestOutcome(i, r.size, r.arrival_s, status, latency_s, slo_s, denoised_s)


def run_system(
    bundle: ModelBundle,
    spec: SystemSpec,
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    config: ReplayConfig,
    desc: str = "",
) -> tuple[list[RequestOutcome], StepLog]:
    """A fresh engine of ``spec`` (fresh predictor, empty cache), warmed up, replaying the trace;
    returns the outcomes and the log of executed steps."""
    engine = build_engine(bundle, spec, config)
    log = StepLog(engine)
    try:
        warm_up(engine, requests)
        return replay(engine, requests, objectives_s, config, desc, log), log
    finally:
        engine.stop()
