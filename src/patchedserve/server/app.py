"""`create_app`: the OpenAI-compatible HTTP front of a served engine (one engine, or a replica group).

Called by ``patchedserve serve`` and tests.

Routes:

* ``POST /v1/images/generations`` - the OpenAI Images API (plus diffusion extension fields);
  an optional ``X-Request-ID`` header names the generation so it can be cancelled.
* ``POST /v1/images/generations/{id}/cancel`` - cancel a running generation; ``cancelled`` says
  whether any of its images was still open (``num_open``: how many) to cancel.
* ``GET /v1/models``, ``GET /v1/models/{id}`` - the served model, in OpenAI list format.
* ``GET /health`` - status (``ok``; ``degraded`` while some replicas are down; ``down``, as a 503,
  when none serves), replicas up, queue sizes.
* ``GET /metrics`` - Prometheus text.

With ``api_key`` every ``/v1`` route asks for ``Authorization: Bearer <api_key>`` (`server.auth`);
``/health`` and ``/metrics`` stay open.

The app does not own the engine's loop: the caller starts the engine before serving and stops it
after. The app registers its metrics observer on the engine and removes it at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Header, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from patchedserve.engine.served import ServedEngine
from patchedserve.server.auth import ApiKeyGate, require_api_key
from patchedserve.server.errors import APIError, error_response, install_error_handlers, shutting_down
from patchedserve.server.generation import CLIENT_GONE_STATUS, ClientDisconnected, ImageService
from patchedserve.server.limits import BodyLimit
from patchedserve.server.metrics import ServerMetrics
from patchedserve.server.schemas import (
    ErrorResponse,
    ImageGenerationRequest,
    ImagesResponse,
    ModelCard,
    ModelList,
    shown,
)

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse} for status in (400, 401, 404, 409, 413, 429, 500, 503)
}
"""Documented error statuses (the OpenAPI page at /docs)."""


def create_app(engine: ServedEngine, api_key: str | None = None) -> FastAPI:
    """An app serving ``engine``'s model; start the engine (``engine.start()``) before serving.
    With ``api_key``, the ``/v1`` routes answer only requests that carry it."""
    metrics = ServerMetrics(engine)
    service = ImageService(engine)
    created = int(time.time())
    card = ModelCard(id=engine.served_model.name, created=created)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        if metrics in engine.observers:
            engine.observers.remove(metrics)

    app = FastAPI(
        title="patchedserve",
        summary=f"OpenAI-compatible image generation with {engine.served_model.name}",
        lifespan=lifespan,
    )
    engine.observers.append(metrics)
    app.state.metrics = metrics
    app.state.service = service
    install_error_handlers(app)
    app.add_middleware(BodyLimit)
    if api_key is not None:
        app.add_middleware(ApiKeyGate, api_key=api_key)  # added last, so it runs first
    v1 = APIRouter(prefix="/v1", dependencies=[] if api_key is None else [Depends(require_api_key(api_key))])

    @v1.post("/images/generations", response_model=ImagesResponse, responses=ERROR_RESPONSES)
    async def generate_images(
        body: ImageGenerationRequest,
        request: Request,
        x_request_id: Annotated[str | None, Header()] = None,
    ) -> ImagesResponse | Response:
        try:
            return await service.generate(body, request, x_request_id)
        except ClientDisconnected:
            return Response(status_code=CLIENT_GONE_STATUS)
        except asyncio.CancelledError:  # a forced quit: the images were cancelled, say so as JSON
            return error_response(shutting_down())

    @v1.post("/images/generations/{gen_id:path}/cancel", responses=ERROR_RESPONSES)  # ids may hold "/"
    async def cancel_generation(gen_id: str) -> dict[str, Any]:
        num_open = service.cancel(gen_id)  # images not yet finished, each sent a cancel
        # False when every image had already finished: the response is on its way, uncancelled.
        return {
            "id": gen_id,
            "object": "image.generation.cancel",
            "cancelled": num_open > 0,
            "num_open": num_open,
        }

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[card])

    @v1.get("/models/{model_id:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
    async def get_model(model_id: str) -> ModelCard:
        if model_id != card.id:
            raise APIError(
                404,
                f"model {shown(model_id)} is not served here; this server serves {card.id!r}",
                param="model",
                code="model_not_found",
            )
        return card

    app.include_router(v1)

    @app.get("/health")
    async def health() -> JSONResponse:
        up = engine.replicas_up
        status = "ok" if all(up) else "degraded" if any(up) else "down"
        return JSONResponse(
            {
                "status": status,
                "model": card.id,
                "replicas": len(up),
                "replicas_up": sum(up),
                "queue_length": engine.num_waiting,
                "active_requests": engine.num_running,
            },
            status_code=503 if status == "down" else 200,  # down: send nothing here
        )

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app
