"""One simulated engine: the real scheduling policy driven through ``Engine.step``'s flow in virtual time.

``SimReplica.iterate(now)`` does what one ``Engine.step`` does, with the model calls replaced by
the cost model: take the inbox (``add_request``), ``schedule``, resolve drops, "prepare" the
admitted (encode cost; NIRVANA's real ``ApproxCache`` may move them forward), run one step of the
active set (every request's ``step_index`` advances; the step costs ``CostModel.step_s``), record
cache points, ``update_from_output`` and send the finished to the decode worker (one at a time,
in the policy's ``decode_priority`` order, as ``engine.decoder`` runs them, slowed by
``CostModel.decode_slowdown`` while the loop has steps to run). The
policies are the engine's own objects, built by its ``engine.scheduling.build_policy`` from the
configuration a real replay gives the system (``bench.systems.engine_config``). Driven by
``cluster.simulator``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from patchedserve.bench.systems import SystemSpec, engine_config
from patchedserve.cluster.costs import CostModel
from patchedserve.cluster.dispatch import WorkOf
from patchedserve.engine.approx_cache import ApproxCache
from patchedserve.engine.scheduling import build_policy
from patchedserve.request import Request, RequestStatus
from patchedserve.sampler.ddim import DDIMSampler
from patchedserve.sampler.dpmpp import DPMPP2MSampler
from patchedserve.sampler.euler import EulerSampler
from patchedserve.sampler.flow import FlowEulerSampler
from patchedserve.scheduler import LatencyPredictor, QueueScheduler, StepOutcome

SAMPLER_ORDER = {cls.name: cls.order for cls in (EulerSampler, DDIMSampler, DPMPP2MSampler, FlowEulerSampler)}
"""Order of each sampler; NIRVANA's cache resumes only single-step (order 1) samplers."""

Embedder = Callable[[str], torch.Tensor]
"""Prompt -> embedding ``[D]`` standing in for the mean token embedding NIRVANA's cache compares."""


def make_policy(
    spec: SystemSpec, predictor: LatencyPredictor, max_running: int, slo_scale: float = 5.0
) -> QueueScheduler:
    """The system's scheduling policy, built by the engine's own ``build_policy`` from the engine
    configuration the real replay gives ``spec`` (its patch size does not reach the policy)."""
    config = engine_config(spec, patch_size=64, profile=None, max_running=max_running)
    return build_policy(replace(config, slo_scale=slo_scale), predictor)


@dataclass
class _Cond:
    """Stands in for ``Conditioning`` where ``ApproxCache.lookup`` reads the prompt embedding."""

    prompt_embeds: torch.Tensor  # [1, D]


class SimReplica:
    """One engine in virtual time; ``next_s`` is when its next iteration starts (None: idle)."""

    def __init__(
        self,
        scheduler: QueueScheduler,
        cost: CostModel,
        max_waiting: int = 256,
        approx_cache: ApproxCache | None = None,
        embed: Embedder | None = None,
        seed: int = 0,
    ) -> None:
        self.scheduler = scheduler
        self.rng = random.Random(seed)
        """Draws the per-step jitter (``CostModel.step_noise``)."""
        self.cost = cost
        self.max_waiting = max_waiting
        self.approx_cache = approx_cache
        self.embed = embed
        self.inbox: list[Request] = []
        self.next_s: float | None = None
        self.decoder_free_s = 0.0
        """When the decode worker finishes what it has started."""
        self._decoding: tuple[Request, float] | None = None
        """The request the decode worker started last, and when (it runs until ``decoder_free_s``)."""
        self._decodes: list[tuple[float, int, Request]] = []
        """Decodes waiting for the worker: (priority, order, request), a heap."""
        self._order = itertools.count()
        self._work_of: WorkOf | None = None
        self._queued_work: dict[int, float] = {}
        """Request id -> ``_work_of`` of each queued request (inbox and waiting), priced once."""
        self.ended: list[Request] = []
        """Requests in a final state (finished ones with ``timings.finished_s`` set)."""
        if approx_cache is not None and embed is None:
            raise ValueError("a simulated approximate cache needs a prompt embedder")

    def submit(self, request: Request, now_s: float) -> bool:
        """Queue an arrival (False: the queue is full, as ``Engine.submit`` refuses); wakes the replica."""
        if self.scheduler.num_waiting + len(self.inbox) >= self.max_waiting:
            return False
        self.inbox.append(request)
        if self._work_of is not None:
            self._queued_work[request.request_id] = self._work_of(request)
        if self.next_s is None:
            self.next_s = now_s
        return True

    def outstanding(self) -> list[Request]:
        """Requests not yet through their last step (what the dispatcher weighs)."""
        return [*self.inbox, *self.scheduler.waiting, *self.scheduler.running]

    def outstanding_work_s(self, work_of: WorkOf) -> float:
        """What the dispatcher weighs: ``work_of`` summed over ``outstanding()``. Queued requests
        are priced once (they do not change until admitted); the running ones at every call."""
        if work_of is not self._work_of:  # another measure: price the queue afresh
            self._work_of = work_of
            self._queued_work = {r.request_id: work_of(r) for r in (*self.inbox, *self.scheduler.waiting)}
        return math.fsum(self._queued_work.values()) + sum(work_of(r) for r in self.scheduler.running)

    def has_work(self) -> bool:
        return bool(self.inbox) or self.scheduler.num_waiting > 0 or self.scheduler.num_running > 0

    def iterate(self, now_s: float) -> None:
        """One ``Engine.step`` at ``now_s``; sets ``next_s`` to its end, or None when idle."""
        for r in self.inbox:
            self.scheduler.add_request(r, now_s)
        self.inbox.clear()
        out = self.scheduler.schedule(now_s)
        for r in (*out.admitted, *out.dropped):
            self._queued_work.pop(r.request_id, None)
        for r in out.dropped:
            self._end(r, now_s)
        if out.admitted:
            now_s += self.cost.encode_s(len(out.admitted), now_s)
            self._lookup(out.admitted)
        running = [r for r in out.running if r.status == RequestStatus.RUNNING]
        if not running:
            self.next_s = None  # nothing to run: sleep until the next arrival wakes it
            return
        step_s = self.cost.step_s(running, now_s) * self.cost.jitter(self.rng)
        latency_s = self.cost.step_with_decode_s(step_s, now_s, self._decoder_busy_until())
        for r in running:
            r.step_index += 1
        end_s = now_s + latency_s
        if self.approx_cache is not None:
            for r in running:
                if self.approx_cache.wants(r):
                    self.approx_cache.record(r, _NO_LATENTS)
        end_s = self._decode(self.scheduler.update_from_output(StepOutcome(running, latency_s, end_s)), end_s)
        self.next_s = end_s if self.has_work() else None

    def _lookup(self, admitted: list[Request]) -> None:
        """NIRVANA: the engine's own cache decides whether an admitted request skips steps."""
        if self.approx_cache is None or self.embed is None:
            return
        for r in admitted:
            r.state["cond"] = _Cond(self.embed(r.prompt)[None])
            self.approx_cache.lookup(r, SAMPLER_ORDER.get(r.params.sampler, 2) == 1)
            r.state.clear()

    def _decode(self, done: list[Request], now_s: float) -> float:
        """Hand the requests that finished denoising at ``now_s`` to the decode worker, or decode
        them in the loop one after another where the policy says so (``decode_inline``); returns
        when the loop is free again."""
        self._start_decodes(now_s, strict=True)  # the worker's turns before these arrived
        for r in done:
            r.timings.denoised_s = now_s
            r.status = RequestStatus.FINISHED
            priority = self.scheduler.decode_priority(r, now_s)
            if self.scheduler.decode_inline(r, now_s, self._ahead(priority, now_s)):
                now_s += self.cost.decode_s(r.params.width, r.params.height, now_s)
                self._end(r, now_s)
                continue
            heapq.heappush(self._decodes, (priority, next(self._order), r))
        self._start_decodes(now_s, strict=False)
        return now_s

    def _ahead(self, priority: float, now_s: float) -> list[tuple[Request, float]]:
        """The decodes a request of ``priority`` would wait for on the worker, as
        ``DecodeWorker.ahead`` reports them: the queued ones that go first, and the one running
        with the seconds it has run."""
        waits = [(r, 0.0) for p, _, r in self._decodes if p <= priority]
        if self._decoding is not None and self.decoder_free_s > now_s:
            r, start_s = self._decoding
            waits.append((r, max(now_s - start_s, 0.0)))
        return waits

    def _start_decodes(self, until_s: float, strict: bool) -> None:
        """Start queued decodes, best priority first, while the worker is free before ``until_s``
        (or at it, unless ``strict``); each request finishes when its decode does."""
        while self._decodes and (
            self.decoder_free_s < until_s or (not strict and self.decoder_free_s == until_s)
        ):
            _, _, r = heapq.heappop(self._decodes)
            start_s = max(self.decoder_free_s, r.timings.denoised_s or 0.0)
            self._decoding = (r, start_s)
            self.decoder_free_s = start_s + self._worker_decode_s(r, start_s)
            self._end(r, self.decoder_free_s)

    def _worker_decode_s(self, r: Request, start_s: float) -> float:
        """A decode on the worker, slowed beside the loop while the replica has steps to run."""
        return self.cost.worker_decode_s(r.params.width, r.params.height, start_s, self.has_work())

    def _decoder_busy_until(self) -> float:
        """When the decode worker runs out of work, if nothing more is queued (a queued decode
        waits for the one before it, so it starts when the worker is free)."""
        busy_s = self.decoder_free_s
        for _, _, r in self._decodes:
            busy_s += self._worker_decode_s(r, busy_s)
        return busy_s

    def _end(self, r: Request, now_s: float) -> None:
        r.timings.finished_s = now_s
        self.ended.append(r)

    def close(self) -> list[Request]:
        """Stops the replica (the run's cut-off): what is still queued or running is cancelled;
        queued decodes complete."""
        self._start_decodes(math.inf, strict=True)
        left = self.outstanding()
        for r in left:
            r.status = RequestStatus.CANCELLED
            self._end(r, math.inf)
        self.inbox.clear()
        self._queued_work.clear()
        return left


_NO_LATENTS = torch.zeros(())
"""What the simulated cache stores as a latent: the cache only needs to know one exists."""
