"""Prometheus metrics of one served engine, on the app's own registry (so tests can build many apps).

`ServerMetrics` is an `EngineObserver`: the engine loop calls ``on_step`` after every denoising step
and ``on_result`` when a request ends (a replica group relays its replicas' steps and results); the
queue gauges read the served engine when scraped, so they are right even while it idles.
`server.app` creates one per app and serves ``render()`` at ``GET /metrics``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from patchedserve.engine import GenerationResult
from patchedserve.engine.served import ServedEngine
from patchedserve.request import RequestStatus

LATENCY_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0)
"""Request latency buckets: tiny models on CPU up to large images on a busy GPU."""
STEP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
"""Step latency buckets."""
PATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Patches-per-step buckets (both CFG branches counted)."""

FINAL_STATES = (RequestStatus.FINISHED, RequestStatus.DROPPED, RequestStatus.CANCELLED, RequestStatus.FAILED)


class ServerMetrics:
    """The server's metrics; register with ``engine.observers.append(metrics)``."""

    def __init__(self, engine: ServedEngine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge(
            "patchedserve_queue_length", "Requests waiting to join the denoising batch.", registry=r
        )
        self.queue_length.set_function(lambda: engine.num_waiting)
        self.active_requests = Gauge(
            "patchedserve_active_requests", "Requests in the denoising batch.", registry=r
        )
        self.active_requests.set_function(lambda: engine.num_running)
        self.replicas_up = Gauge(
            "patchedserve_replicas_up", "Engine replicas serving (1 for one engine in-process).", registry=r
        )
        self.replicas_up.set_function(lambda: sum(engine.replicas_up))
        self.step_patches = Histogram(
            "patchedserve_step_patches", "Patches denoised per step.", buckets=PATCH_BUCKETS, registry=r
        )
        self.step_latency = Histogram(
            "patchedserve_step_latency_seconds",
            "Wall time of one denoising step.",
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self.request_latency = Histogram(
            "patchedserve_request_latency_seconds",
            "Arrival to finished image, by WIDTHxHEIGHT.",
            ["resolution"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.queue_wait = Histogram(
            "patchedserve_queue_wait_seconds",
            "Arrival to admission into the denoising batch, of every admitted request.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.requests = Counter(
            "patchedserve_requests", "Requests that ended, by final status.", ["status"], registry=r
        )
        for status in FINAL_STATES:
            self.requests.labels(status.name.lower())
        self.slo = Counter(
            "patchedserve_slo_requests",
            "Requests with a deadline, by whether it was met.",
            ["outcome"],
            registry=r,
        )
        for outcome in ("met", "missed"):
            self.slo.labels(outcome)
        if engine.has_patch_cache:  # the patch-level block cache, when the engine runs one
            self.cache_reuse = Gauge(
                "patchedserve_patch_cache_reuse_ratio",
                "Share of patch-block computations served from the patch cache since start.",
                registry=r,
            )
            self.cache_reuse.set_function(lambda: engine.patch_cache_usage().reuse_fraction)
            self.cache_bytes = Gauge(
                "patchedserve_patch_cache_bytes", "Memory the patch cache holds now.", registry=r
            )
            self.cache_bytes.set_function(lambda: engine.patch_cache_usage().nbytes)

    def on_step(self, latency_s: float, num_patches: int, num_running: int, num_waiting: int) -> None:
        self.step_latency.observe(latency_s)
        self.step_patches.observe(num_patches)

    def on_result(self, result: GenerationResult) -> None:
        self.requests.labels(result.status.name.lower()).inc()
        queue_s = result.timings.get("queue_s")
        if queue_s is not None:
            self.queue_wait.observe(queue_s)
        latency_s = result.timings.get("latency_s")
        if result.ok and latency_s is not None:
            p = result.params
            self.request_latency.labels(f"{p.width}x{p.height}").observe(latency_s)
        if result.deadline_met is not None:
            self.slo.labels("met" if result.deadline_met else "missed").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
