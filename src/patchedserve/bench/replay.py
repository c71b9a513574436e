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
from dataclasses import dataclass, fields
from functools import partial
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from patchedserve.bench.metrics import RequestOutcome
from patchedserve.bench.results import StepProgress, StepRecord
from patchedserve.bench.systems import SystemSpec, engine_config
from patchedserve.bench.traces import TraceRequest
from patchedserve.engine import Engine, GenerationResult, QueueFullError
from patchedserve.engine.served import ServedEngine
from patchedserve.models import ModelBundle
from patchedserve.request import GenerationRequest, Request, RequestStatus
from patchedserve.scheduler import StepOutcome, entry_of

if TYPE_CHECKING:
    from patchedserve.cluster.ray_group import RayEngineGroup

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
    replicas: int | None = None
    """Serve each system from this many engine replicas on Ray (``cluster.ray_group``) instead of
    one in-process engine."""
    cpus_per_replica: int | None = None
    """With ``replicas``: CPUs (and torch threads) per replica; None shares out the cluster's."""
    replica_profile: str | None = None
    """With ``replicas``: the replicas' latency profile (their policy and dispatch); None is
    ``profile``, which sets the deadlines either way."""
    model: str = "tiny-sdxl"
    """With ``replicas``: what each replica loads (a built-in name or a folder)."""


def build_engine(bundle: ModelBundle, spec: SystemSpec, config: ReplayConfig) -> Engine:
    """A started engine of ``spec``, warmed up on ``warm_sizes`` by the caller."""
    econf = engine_config(
        spec, config.patch_size, config.profile, config.max_running, config.device, config.dtype
    )
    engine = Engine(bundle, econf)
    engine.start()
    return engine


def warm_up_requests(requests: Sequence[TraceRequest]) -> list[GenerationRequest]:
    """One single-step request per size of the trace (builds kernels and layouts).

    One step never matches NIRVANA's cache points, so it seeds nothing a trace request could reuse.
    """
    sizes = sorted({(r.width, r.height, r.guidance_scale, r.sampler) for r in requests})
    return [
        GenerationRequest("warm-up", width=w, height=h, steps=1, guidance_scale=g, sampler=s, slo_ms=1e9)
        for w, h, g, s in sizes
    ]


def warm_up(engine: Engine, gens: Sequence[GenerationRequest]) -> None:
    """Runs ``gens`` together, then resets the predictor's online correction, so every run starts
    from the profile. Also what each replica of a Ray group runs (``EngineReplica.warm_up``)."""
    for f in engine.submit_many(gens):
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
        self.replica: list[int] | None = None
        """Per record, the replica that ran it: none for one engine (``ReplicaStepLogs`` has them)."""
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


class ReplicaStepLogs:
    """A ``StepLog`` over the replicas of a Ray group: each replica logs its own steps
    (``EngineReplica.log_steps``, its times moved onto its own machine's clock); ``collect`` merges
    them by start time. Request ids are
    made unique across replicas (id x replicas + replica index), and ``replica`` says whose each
    step was."""

    def __init__(self, group: RayEngineGroup) -> None:
        self.group = group
        self.records: list[StepRecord] = []
        self.progress: list[StepProgress] = []
        self.replica: list[int] | None = []

    def restart(self, start_s: float) -> None:
        self.group.log_steps(start_s)

    def collect(self) -> None:
        logs = self.group.logged_steps()
        rows = [
            (record, [(rid * len(logs) + i, step) for rid, step in taken], i)
            for i, (records, progress) in enumerate(logs)
            for record, taken in zip(records, progress, strict=True)
        ]
        rows.sort(key=lambda row: row[0][0])
        self.records = [record for record, _, _ in rows]
        self.progress = [taken for _, taken, _ in rows]
        self.replica = [i for _, _, i in rows]


def replay(
    engine: ServedEngine,
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    config: ReplayConfig,
    desc: str = "",
    log: StepLog | ReplicaStepLogs | None = None,
) -> list[RequestOutcome]:
    """Submits ``requests`` at their arrival instants to ``engine`` (one ``Engine``, or a Ray group
    of them); returns one outcome per request, in order. A request's latency is taken here, from
    its submit call to its result, as a caller sees it (for a Ray group that includes the calls to
    the replicas); the engine's own clock is ``time.monotonic`` too."""
    futures: dict[int, Future[GenerationResult]] = {}
    rejected: set[int] = set()
    deadlines: list[float] = []
    latencies: dict[int, float] = {}
    bar = tqdm(total=len(requests), desc=desc, disable=not config.progress, leave=False, unit="req")
    clock = time.monotonic
    start = clock()
    if log is not None:
        log.restart(start)
    for i, (r, slo_s) in enumerate(zip(requests, objectives_s, strict=True)):
        while clock() < start + r.arrival_s:
            time.sleep(min(POLL_S, max(start + r.arrival_s - clock(), 0.0)))
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
        submitted_s = clock()
        try:
            (futures[i],) = engine.submit_many([gen])
        except QueueFullError:
            rejected.add(i)
            continue
        deadlines.append(submitted_s + slo_s)
        futures[i].add_done_callback(partial(_took, latencies, i, submitted_s))
    _finish(
        engine,
        futures,
        max(deadlines, default=clock()),
        config.drain_timeout_s,
        lambda: _update(bar, futures, rejected),
    )
    _update(bar, futures, rejected)
    bar.close()
    return [
        _outcome(i, r, slo, futures.get(i), latencies.get(i))
        for i, (r, slo) in enumerate(zip(requests, objectives_s, strict=True))
    ]


def _took(latencies: dict[int, float], i: int, submitted_s: float, _: Future[GenerationResult]) -> None:
    latencies[i] = time.monotonic() - submitted_s


def _finish(
    engine: ServedEngine,
    futures: dict[int, Future[GenerationResult]],
    cutoff_s: float,
    drain_timeout_s: float,
    tick: Callable[[], None],
) -> None:
    """Waits for every request until ``cutoff_s`` (the last deadline), then cancels what is left and
    waits (at most ``drain_timeout_s``) for the step and decodes in flight."""
    while time.monotonic() < cutoff_s and not all(f.done() for f in futures.values()):
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
    i: int, r: TraceRequest, slo_s: float, future: Future[GenerationResult] | None, latency_s: float | None
) -> RequestOutcome:
    if future is None:
        return RequestOutcome(i, r.size, r.arrival_s, "rejected", None, slo_s)
    if not future.done():
        return RequestOutcome(i, r.size, r.arrival_s, "cancelled", None, slo_s)
    result = future.result()
    status = _STATUS.get(result.status, "failed")
    if status != "finished":
        return RequestOutcome(i, r.size, r.arrival_s, status, None, slo_s)
    return RequestOutcome(
        i, r.size, r.arrival_s, status, latency_s, slo_s, result.timings.get("denoise_done_s")
    )


def run_system(
    bundle: ModelBundle,
    spec: SystemSpec,
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    config: ReplayConfig,
    desc: str = "",
) -> tuple[list[RequestOutcome], StepLog | ReplicaStepLogs]:
    """A fresh engine of ``spec`` (fresh predictor, empty cache), warmed up, replaying the trace;
    returns the outcomes and the log of executed steps."""
    if config.replicas is not None:
        return run_on_replicas(spec, requests, objectives_s, config, desc)
    engine = build_engine(bundle, spec, config)
    log = StepLog(engine)
    try:
        warm_up(engine, warm_up_requests(requests))
        return replay(engine, requests, objectives_s, config, desc, log), log
    finally:
        engine.stop()


def run_on_replicas(
    spec: SystemSpec,
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    config: ReplayConfig,
    desc: str = "",
) -> tuple[list[RequestOutcome], ReplicaStepLogs]:
    """``run_system`` on ``config.replicas`` fresh engines of ``spec`` in Ray actors, behind the
    group's least-predicted-work dispatch (what ``serve --replicas`` runs); each replica is warmed
    up on its own and logs its steps."""
    from patchedserve.cluster.ray_group import RayEngineGroup  # Ray is needed only here

    assert config.replicas is not None
    profile = config.replica_profile or config.profile
    econf = engine_config(spec, config.patch_size, profile, config.max_running, config.device, config.dtype)
    options = {f.name: getattr(econf, f.name) for f in fields(econf)}
    group = RayEngineGroup(config.model, options, config.replicas, cpus_per_replica=config.cpus_per_replica)
    try:
        group.start()
        group.warm_up(warm_up_requests(requests))
        log = ReplicaStepLogs(group)
        outcomes = replay(group, requests, objectives_s, config, desc, log)
        log.collect()
        return outcomes, log
    finally:
        group.shutdown()
