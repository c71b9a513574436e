"""`ImageService`: one images request end to end, between the HTTP route and the engine.

Owns the request's life on the server: submit its ``n`` engine requests (from a worker thread),
wait for them while watching for the client to go away, cancel whatever is still queued or running
when the request ends early (disconnect, cancel call, one image failing), encode the images (PNG,
JPEG or WebP) off the event loop and build the response. Keeps the in-flight generations by id for
``POST .../{id}/cancel``.
Called by the routes in `server.app`.
"""

from __future__ import annotations

import asyncio
import base64
import io
import time
import uuid
from collections.abc import Awaitable
from concurrent.futures import Future
from typing import Any

import PIL.Image
from starlette.requests import Request

from patchedserve.engine import GenerationResult, QueueFullError
from patchedserve.engine.served import ServedEngine
from patchedserve.errors import InvalidRequestError, ReplicaLostError
from patchedserve.request import GenerationRequest, RequestStatus
from patchedserve.server.errors import APIError
from patchedserve.server.schemas import (
    GenerationInfo,
    ImageData,
    ImageGenerationRequest,
    ImageInfo,
    ImagesResponse,
    OutputFormat,
    shown,
)

CLIENT_GONE_STATUS = 499
"""Status logged for a request whose client disconnected (nginx's convention; nobody reads it)."""


NO_RETRY = {"x-should-retry": "false"}
"""Tells the OpenAI clients, which retry 409 and 5xx by default, not to: a retry would undo a
cancel, or fail again the same way."""


class ClientDisconnected(Exception):
    """The client closed the connection before its images were ready."""


class ImageService:
    """Turns images requests into engine requests and engine results into responses."""

    def __init__(self, engine: ServedEngine) -> None:
        self.engine = engine
        self.inflight: dict[str, list[Future[GenerationResult]]] = {}
        """Generation id -> its engine futures, while the HTTP request is open."""
        self.cancelled: set[str] = set()
        """Ids cancelled by a cancel call, so their response says so."""
        self.submitting: dict[str, int] = {}
        """Generation id -> how many engine requests, while they are being queued."""

    async def generate(
        self, body: ImageGenerationRequest, http: Request, gen_id: str | None
    ) -> ImagesResponse:
        """Runs one images request; raises `APIError` or `ClientDisconnected`."""
        self._check_model(body.model)
        gen_id = gen_id or f"img-{uuid.uuid4().hex[:24]}"
        if gen_id in self.inflight:
            raise APIError(
                409,
                f"a generation with id {shown(gen_id)} is already running",
                param="X-Request-ID",
                code="duplicate_id",
            )
        futures: list[Future[GenerationResult]] = []
        self.inflight[gen_id] = futures
        try:
            gens = self._engine_requests(body)
            self.submitting[gen_id] = len(gens)
            try:
                futures.extend(await self._submit(gens))
            finally:
                del self.submitting[gen_id]
            if gen_id in self.cancelled:  # a cancel call came while they were being queued
                self._cancel_open(futures)
            try:
                results = await wait_results(futures, wait_for_disconnect(http))
            except ReplicaLostError as err:
                raise APIError.replica_lost(err) from err
            if results is None:
                raise ClientDisconnected
            failed = [r for r in results if r is not None and not r.ok]
            if failed:
                raise self._result_error(failed[0], gen_id)
            finished = [r for r in results if r is not None]
            return await self._response(gen_id, body, finished)
        finally:
            del self.inflight[gen_id]
            self.cancelled.discard(gen_id)
            self._cancel_open(futures)

    def cancel(self, gen_id: str) -> int:
        """Cancels the engine requests of an in-flight generation; returns how many were still open
        (all of them while they are being queued: they are cancelled once queued)."""
        futures = self.inflight.get(gen_id)
        if futures is None:
            message = f"no generation with id {shown(gen_id)} is running"
            raise APIError(404, message, param="id", code="not_found")
        self.cancelled.add(gen_id)
        return self.submitting.get(gen_id) or self._cancel_open(futures)

    def _cancel_open(self, futures: list[Future[GenerationResult]]) -> int:
        """Sends a cancel for each future not done yet; returns how many."""
        open_futures = [f for f in futures if not f.done()]
        for f in open_futures:
            self.engine.cancel(f.request_id)  # type: ignore[attr-defined]
        return len(open_futures)

    def _check_model(self, model: str | None) -> None:
        name = self.engine.served_model.name
        if model is not None and model != name:
            raise APIError(
                400,
                f"model {shown(model)} is not served here; this server serves {name!r}",
                param="model",
                code="model_not_found",
            )

    @staticmethod
    def _engine_requests(body: ImageGenerationRequest) -> list[GenerationRequest]:
        width, height = body.resolution()
        return [
            GenerationRequest(
                prompt=body.prompt,
                negative_prompt=body.negative_prompt,
                width=width,
                height=height,
                steps=body.num_inference_steps,
                guidance_scale=body.guidance_scale,
                seed=body.seed + i,
                sampler=body.sampler,
                slo_ms=body.slo_ms,
            )
            for i in range(body.n)
        ]

    async def _submit(self, gens: list[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Queues ``gens`` from a worker thread: a Ray group's placement waits on its replicas, which
        must not stall the event loop. Should this task be cancelled meanwhile (server shutdown),
        what the thread then queues is cancelled, not left running for nobody."""
        job = asyncio.ensure_future(asyncio.to_thread(self._submit_now, gens))
        try:
            return await asyncio.shield(job)
        except asyncio.CancelledError:
            job.add_done_callback(self._cancel_orphans)
            raise

    def _cancel_orphans(self, job: asyncio.Future[list[Future[GenerationResult]]]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._cancel_open(job.result())

    def _submit_now(self, gens: list[GenerationRequest]) -> list[Future[GenerationResult]]:
        try:
            return self.engine.submit_many(gens)  # all n images or none: no half-admitted request
        except InvalidRequestError as err:
            raise APIError.invalid(err) from err
        except QueueFullError as err:
            raise APIError.queue_full(str(err)) from err
        except ReplicaLostError as err:
            raise APIError.replica_lost(err) from err

    def _result_error(self, result: GenerationResult, gen_id: str) -> APIError:
        reason = result.error or "no reason given"
        if result.status == RequestStatus.DROPPED:
            return APIError(
                503,
                f"the scheduler dropped this request: {reason}",
                type="server_error",
                code="slo_infeasible",
            )
        if result.status == RequestStatus.CANCELLED:
            by = "by a cancel call" if gen_id in self.cancelled else "by the server"
            message = f"generation {shown(gen_id)} was cancelled {by}"
            return APIError(409, message, code="request_cancelled", headers=NO_RETRY)
        return APIError(
            500,
            f"generation failed: {reason}",
            type="server_error",
            code="generation_failed",
            headers=NO_RETRY,
        )

    async def _response(
        self, gen_id: str, body: ImageGenerationRequest, results: list[GenerationResult]
    ) -> ImagesResponse:
        fmt, quality = body.output_format, body.output_compression
        encodes = (asyncio.to_thread(encode_image, r.image, fmt, quality) for r in results)
        images = await asyncio.gather(*encodes)
        infos = [
            ImageInfo(
                request_id=r.request_id,
                width=r.params.width,
                height=r.params.height,
                steps=r.params.steps,
                guidance_scale=r.params.guidance_scale,
                sampler=r.params.sampler,
                seed=r.params.seed,
                timings=r.timings,
                deadline_met=r.deadline_met,
            )
            for r in results
        ]
        first = results[0].params
        return ImagesResponse(
            created=int(time.time()),
            data=[ImageData(b64_json=b64) for b64 in images],
            size=f"{first.width}x{first.height}",
            output_format=fmt,
            patchedserve=GenerationInfo(id=gen_id, model=self.engine.served_model.name, images=infos),
        )


def encode_image(image: PIL.Image.Image | None, fmt: OutputFormat, quality: int | None = None) -> str:
    """A finished image as a base64 file of format ``fmt``; ``quality`` (0-100, default 100) for
    JPEG and WebP. Runs on a worker thread: encoding a large image takes a while."""
    if image is None:
        raise ValueError("a finished result carries no image")
    buffer = io.BytesIO()
    if fmt == "png":
        image.save(buffer, format="PNG")
    else:
        image.save(buffer, format=fmt.upper(), quality=100 if quality is None else quality)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


async def wait_for_disconnect(http: Request) -> None:
    """Returns when the client disconnects; the body was read already, so nothing else arrives."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def wait_results(
    futures: list[Future[GenerationResult]], disconnected: Awaitable[None]
) -> list[GenerationResult | None] | None:
    """Waits until every result is in or one is not FINISHED; None when ``disconnected`` fires first.

    Results not in yet when one fails are None.
    """
    waiters = [asyncio.wrap_future(f) for f in futures]
    watcher = asyncio.ensure_future(disconnected)
    pending: set[asyncio.Future[Any]] = {watcher, *waiters}
    try:
        while any(not w.done() for w in waiters):
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            if watcher in done:
                return None
            if any(not w.result().ok for w in waiters if w in done):
                break
    finally:
        watcher.cancel()
    return [w.result() if w.done() else None for w in waiters]
