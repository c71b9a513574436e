"""``Engine``: step-level continuous batching of mixed-resolution requests over one patched model.

One iteration (``step``): take arrivals and cancellations from the thread-safe inbox, ask the
scheduler for the active set, prepare joiners (batched prompt encoding, noise), run one patched
denoising step for all running requests, report the step to the scheduler, and hand finished
latents to the decode worker (``decoder.py``, in the order the policy gives). Results arrive as
``concurrent.futures.Future`` objects, so the same engine serves blocking callers (``generate``),
a background loop (``start``) and asyncio (``agenerate``). A failing request fails alone; nothing
a request does stops the loop. Every accepted request is answered: ``stop`` cancels what it
still holds, and ``start`` after ``stop`` serves again.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError

import torch

from patchedserve.engine.approx_cache import ApproxCache, ApproxCacheConfig
from patchedserve.engine.batch import DenoiseBatch
from patchedserve.engine.config import EngineConfig
from patchedserve.engine.decoder import DecodeWorker
from patchedserve.engine.image_batch import ImageBatch
from patchedserve.engine.prepare import Preparer
from patchedserve.engine.results import EngineObserver, GenerationResult
from patchedserve.engine.scheduling import build_scheduler
from patchedserve.engine.served import CacheUsage, ServedModel
from patchedserve.errors import InvalidRequestError, PatchedServeError
from patchedserve.models import GenerationParams, ModelBundle, decode_latents, load_model, validate_generation
from patchedserve.models.validation import check_prompts, check_slo_ms
from patchedserve.patch import PatchedModel
from patchedserve.request import GenerationRequest, Request, RequestStatus
from patchedserve.scheduler import Scheduler, StepOutcome

log = logging.getLogger(__name__)


class QueueFullError(PatchedServeError):
    """The waiting queue is at ``max_waiting``; retry later."""


class Engine:
    """Serves many requests of different sizes and step counts on one model."""

    def __init__(
        self, bundle: ModelBundle, config: EngineConfig | None = None, scheduler: Scheduler | None = None
    ) -> None:
        self.bundle = bundle
        self.config = config or EngineConfig()
        self.device = torch.device(self.config.device)
        weight = next(bundle.denoiser.parameters())
        if weight.device != self.device or weight.dtype != self.config.torch_dtype:
            bundle.denoiser.to(self.device, self.config.torch_dtype)
        self.model = PatchedModel(
            bundle.denoiser,
            self.config.patch_size,
            bundle.vae_scale_factor,
            max_patches_per_call=self.config.max_patches_per_call,
            cache=self.config.patch_cache,
            streams=self.config.streams,
        )
        self.preparer = Preparer(bundle, self.device, self.config.torch_dtype)
        self.batch = self._new_batch()
        self.approx_cache = (
            ApproxCache(ApproxCacheConfig(similarity=self.config.approx_cache_similarity))
            if self.config.approx_cache
            else None
        )
        self.scheduler = scheduler or build_scheduler(self.config, bundle, self.model)
        self.observers: list[EngineObserver] = []
        self.clock = time.monotonic
        self._ids = itertools.count()
        self._inbox: list[Request] = []
        """Requests submitted and not yet handed to the scheduler by the loop (under
        ``_submit_lock``): the loop takes them at the next step boundary."""
        self._cancels: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._futures: dict[int, Future[GenerationResult]] = {}
        self._threads = torch.get_num_threads()
        """The creator's torch thread count, which the loop and decode threads set for themselves:
        a new thread otherwise takes the count last set anywhere in the process (stream workers set
        theirs to a share)."""
        self._decoder: DecodeWorker[Request] | None = self._new_decoder()
        self._decode_lock = threading.Lock()
        self._queued_decodes: dict[int, bool] = {}
        """Requests queued on the decode worker and not started there yet -> cancelled since (the
        worker then resolves them without decoding)."""
        self._wake = threading.Event()
        self._submit_lock = threading.Lock()
        self._stop = threading.Event()
        self._loop: threading.Thread | None = None

    @classmethod
    def from_model(cls, model: str | ModelBundle = "tiny-sdxl", **config: object) -> Engine:
        """An engine for a built-in name or local folder; keyword arguments go to ``EngineConfig``."""
        bundle = model if isinstance(model, ModelBundle) else load_model(model)
        return cls(bundle, EngineConfig(**config))  # type: ignore[arg-type]

    def _new_decoder(self) -> DecodeWorker[Request] | None:
        if not self.config.decode_in_thread:
            return None
        return DecodeWorker(self._threads, clock=lambda: self.clock())

    def _new_batch(self) -> DenoiseBatch | ImageBatch:
        if self.config.execution == "image":
            return ImageBatch(self.bundle, self.preparer.samplers, self.device, self.config.streams)
        return DenoiseBatch(self.model, self.preparer.samplers, self.device)

    # ------------------------------------------------------------------ what the server reads
    @property
    def served_model(self) -> ServedModel:
        return ServedModel(self.bundle.name, self.bundle.defaults, self.model.patch_size)

    @property
    def num_waiting(self) -> int:
        """Requests queued: submitted and not yet admitted (as the queue-full check counts them)."""
        return self.scheduler.num_waiting + len(self._inbox)

    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def replicas_up(self) -> list[bool]:
        return [self._loop is not None]

    @property
    def has_patch_cache(self) -> bool:
        return self.model.cache is not None

    def patch_cache_usage(self) -> CacheUsage:
        stats = self.model.cache_stats()
        return CacheUsage(stats.patch_blocks, stats.reused, self.model.cache_nbytes())

    # ------------------------------------------------------------------ submitting
    def submit(self, gen: GenerationRequest) -> Future[GenerationResult]:
        """Validate and queue one request; its future resolves when it reaches a final state. The
        engine moves requests on while its loop runs (``start``) or while the caller drives it
        (``step``, ``generate``); a future submitted to a stopped engine waits for either.

        Raises:
            InvalidRequestError: a field is out of range (message names it).
            QueueFullError: ``max_waiting`` requests are already queued.
        """
        return self.submit_many([gen])[0]

    def submit_many(self, gens: Sequence[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Validate and queue requests all together or none (same errors as ``submit``; a group
        larger than ``max_waiting`` is an ``InvalidRequestError`` on field ``n``)."""
        params = [self._validate(g) for g in gens]
        limit = self.config.max_waiting
        if len(gens) > limit:
            raise InvalidRequestError(
                f"{len(gens)} images at once exceed this server's queue of {limit}", field="n"
            )
        with self._submit_lock:  # check and enqueue together, so concurrent submits cannot overshoot
            if self.scheduler.num_waiting + len(self._inbox) + len(gens) > limit:
                raise QueueFullError(f"the queue is full ({limit} waiting); retry later")
            return [self._enqueue(g, p) for g, p in zip(gens, params, strict=True)]

    def _validate(self, gen: GenerationRequest) -> GenerationParams:
        check_prompts(gen.prompt, gen.negative_prompt)
        check_slo_ms(gen.slo_ms)
        width, height = gen.width, gen.height
        if self.config.execution == "patched":  # the patch rule is this engine's, and the stricter one
            default_width, default_height = self.served_model.default_size
            width = default_width if width is None else width
            height = default_height if height is None else height
            lp = self.model.patch_size
            sides = [v for v in (width, height) if isinstance(v, int) and not isinstance(v, bool)]
            if any(v % lp for v in sides):
                raise InvalidRequestError(
                    f"size {width}x{height} is not a multiple of this engine's patch size {lp} px; "
                    f"allowed sizes are multiples of {lp} in both width and height",
                    field="size",
                )
        return validate_generation(
            self.bundle, width, height, gen.steps, gen.guidance_scale, gen.sampler, gen.seed
        )

    def _enqueue(self, gen: GenerationRequest, params: GenerationParams) -> Future[GenerationResult]:
        lp = self.model.patch_size
        req = Request(
            request_id=next(self._ids),
            prompt=gen.prompt,
            negative_prompt=gen.negative_prompt,
            params=params,
            arrival_s=self.clock(),
            num_patches=(params.width // lp) * (params.height // lp),
            slo_ms=gen.slo_ms,
        )
        future: Future[GenerationResult] = Future()
        future.request_id = req.request_id  # type: ignore[attr-defined]
        self._futures[req.request_id] = future
        self._inbox.append(req)  # the caller holds _submit_lock
        self._wake.set()
        return future

    def submitted(self) -> list[Request]:
        """The requests submitted since the loop last took them (it does at each step boundary):
        with the scheduler's queue and batch, all the work this engine holds (a replica's load)."""
        with self._submit_lock:
            return list(self._inbox)

    def cancel(self, request_id: int) -> None:
        """Cancel a request: a queued or running one leaves at the next step boundary, one waiting
        on the decode worker is not decoded (no-op when it already ended or its decode began)."""
        self._cancel_decode(request_id)
        self._cancels.put(request_id)
        self._wake.set()

    def _cancel_decode(self, request_id: int) -> None:
        with self._decode_lock:
            if request_id in self._queued_decodes:
                self._queued_decodes[request_id] = True

    # ------------------------------------------------------------------ the loop
    def has_work(self) -> bool:
        s = self.scheduler
        return bool(self._inbox) or not self._cancels.empty() or s.num_waiting > 0 or s.num_running > 0

    def step(self) -> None:
        """One iteration: admit, prepare, denoise one step, retire finished requests."""
        if self._decoder is not None and self._decoder.closed:  # driven again after ``stop``
            self._decoder = self._new_decoder()
        now = self.clock()
        self._drain_inbox(now)
        out = self.scheduler.schedule(now)
        for r in out.dropped:
            self._resolve(r)
        if out.admitted:
            self._prepare(out.admitted)
        running = [r for r in out.running if r.status == RequestStatus.RUNNING]
        if not running:
            self.model.clear_cache()  # idle: nothing left to reuse, give the memory back
            return
        start = self.clock()
        try:
            self.batch.sync(running, out.paused)
            self.batch.step()
        except Exception as err:
            log.exception("denoising step failed")
            self.batch = self._new_batch()
            self._fail([r.request_id for r in running], f"denoising step failed: {err}")
            return
        end = self.clock()
        for r in out.admitted:
            r.timings.first_step_s = start
        if self.approx_cache is not None:
            for r in running:
                if self.approx_cache.wants(r):
                    self.approx_cache.record(r, self.batch.final_latents(r))
        for done in self.scheduler.update_from_output(StepOutcome(running, end - start, end)):
            try:
                self._retire(done)
            except Exception as err:  # the scheduler let it go already: answer it here
                log.exception("retiring request %d failed", done.request_id)
                done.status, done.error = RequestStatus.FAILED, f"finishing failed: {err}"
                self._resolve(done)
        num_patches = sum(r.num_patches * r.num_entries for r in running)
        for o in self.observers:
            try:
                o.on_step(end - start, num_patches, len(running), self.scheduler.num_waiting)
            except Exception:
                log.exception("observer %r failed on a step", o)

    def _drain_inbox(self, now: float) -> None:
        with self._submit_lock:
            taken, self._inbox = self._inbox, []
        for r in taken:
            self.scheduler.add_request(r, now)
        cancels = []
        while not self._cancels.empty():
            cancels.append(self._cancels.get())
        self._cancel_held(cancels, "cancelled")

    def _cancel_held(self, ids: Sequence[int], message: str) -> None:
        for r in self.scheduler.finish_requests(ids, RequestStatus.CANCELLED):
            r.error = message
            self._resolve(r)

    def _prepare(self, admitted: list[Request]) -> None:
        start = self.clock()
        for r in admitted:
            r.timings.admitted_s = start
        try:
            self.preparer.prepare(admitted)
        except Exception as err:
            log.exception("request preparation failed")
            self._fail([r.request_id for r in admitted], f"preparation failed: {err}")
            return
        now = self.clock()
        for r in admitted:
            r.timings.encoded_s = now
            if self.approx_cache is not None:
                self.approx_cache.lookup(r, self.preparer.sampler(r.params.sampler).order == 1)

    def _fail(self, ids: Sequence[int], message: str) -> None:
        for r in self.scheduler.finish_requests(ids, RequestStatus.FAILED):
            r.error = message
            self._resolve(r)

    def _retire(self, r: Request) -> None:
        """Take a fully denoised request out and decode it (on the worker thread if configured)."""
        latents = self.batch.final_latents(r).clone()  # [C, h, w]
        now = r.timings.denoised_s = self.clock()
        r.state.clear()
        if self._decoder is None:
            self._decode(r, latents)
            return
        priority = self.scheduler.decode_priority(r, now)
        if self.scheduler.decode_inline(r, now, self._decoder.ahead(priority)):
            self._decode(r, latents)
            return
        with self._decode_lock:
            self._queued_decodes[r.request_id] = False
        self._decoder.submit(priority, lambda: self._decode_queued(r, latents), r)

    def _decode_queued(self, r: Request, latents: torch.Tensor) -> None:
        """The worker's job: decode ``r`` unless it was cancelled while it waited."""
        with self._decode_lock:
            cancelled = self._queued_decodes.pop(r.request_id, False)
        if cancelled:
            r.status, r.error = RequestStatus.CANCELLED, "cancelled"
            self._resolve(r)
        else:
            self._decode(r, latents)

    def _decode(self, r: Request, latents: torch.Tensor) -> None:
        try:
            image = decode_latents(self.bundle, latents[None])[0]
        except Exception as err:
            log.exception("decode failed for request %d", r.request_id)
            r.status, r.error = RequestStatus.FAILED, f"decode failed: {err}"
            self._resolve(r)
            return
        r.status = RequestStatus.FINISHED
        self._resolve(r, image)

    def _resolve(self, r: Request, image: object = None) -> None:
        r.timings.finished_s = self.clock()
        r.state.clear()
        result = GenerationResult.of(r, image)  # type: ignore[arg-type]
        for o in self.observers:  # before the future, so a caller woken by it sees the observers' view
            try:
                o.on_result(result)
            except Exception:
                log.exception("observer %r failed on request %d", o, r.request_id)
        future = self._futures.pop(r.request_id, None)
        if future is not None:
            with contextlib.suppress(InvalidStateError):  # its caller cancelled it: nobody waits
                future.set_result(result)

    # ------------------------------------------------------------------ front ends
    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate all requests (blocking); results in input order.

        All or nothing: if one request is invalid, none is queued. A list longer than the free room
        in the queue is queued as room frees up, so any number of requests can be generated.
        """
        for g in requests:
            self._validate(g)
        pending = list(requests)
        futures: list[Future[GenerationResult]] = []
        while pending or not all(f.done() for f in futures):
            if pending:
                room = self.config.max_waiting - self.num_waiting
                if room > 0:
                    with contextlib.suppress(QueueFullError):  # another caller took the room first
                        futures += self.submit_many(pending[:room])
                        del pending[:room]
            if self._loop is None and self.has_work():
                self.step()
            else:
                time.sleep(0.005)
        return [f.result() for f in futures]

    async def agenerate(self, gen: GenerationRequest) -> GenerationResult:
        """Asyncio front: needs the background loop (``start``)."""
        if self._loop is None:
            raise RuntimeError("call Engine.start() before agenerate")
        future = self.submit(gen)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:  # the awaiting task went away: free the request's slot
            self.cancel(future.request_id)  # type: ignore[attr-defined]
            raise

    def start(self) -> None:
        """Run the loop on a background thread (for servers); again after ``stop``."""
        if self._loop is not None:
            return
        self._stop.clear()
        self._loop = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._loop.start()

    def stop(self) -> None:
        """Stop the loop, cancel the requests still queued or denoising ("engine stopped"), finish
        the decodes already queued, and stop the decode worker."""
        self._stop.set()
        self._wake.set()
        if self._loop is not None:
            self._loop.join()
            self._loop = None
        self._drain_inbox(self.clock())  # queued ones join the scheduler, then all are cancelled
        self._cancel_held(list(self._futures), "engine stopped")  # those on the decode worker are not held
        if self._decoder is not None:
            self._decoder.shutdown()

    def __enter__(self) -> Engine:
        """``with Engine.from_model(...) as engine:`` runs the loop in the background (``start``)
        for the block and stops the engine (``stop``) when it ends."""
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while not self._stop.is_set():
            if self.has_work():
                try:
                    self.step()
                except Exception:
                    log.exception("engine iteration failed")
            else:
                self._wake.wait(0.05)
                self._wake.clear()
