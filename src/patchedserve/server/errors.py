"""Every error the server returns, as an OpenAI error object; installed on the app by `server.app`.

One table maps what went wrong to an HTTP status: bad input is 400 with ``param`` naming the
request field (FastAPI's 422 validation errors included), a full queue 429 with ``Retry-After``,
an SLO the scheduler gave up on 503, a failed generation 500, a missing or wrong API key 401
(`server.auth`). The engine's field names are translated to the API's (``width`` -> ``size``,
``steps`` -> ``num_inference_steps``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from patchedserve.errors import InvalidRequestError
from patchedserve.server.schemas import ErrorObject, ErrorResponse, shown

RETRY_AFTER_S = 1
"""Seconds a client is told to wait after a 429."""

OPENAI_UNSUPPORTED = frozenset({"style", "stream", "partial_images", "input_fidelity"})
"""OpenAI Images API fields this server refuses at any value (it has no styles and does not stream)."""

API_PARAM = {"width": "size", "height": "size", "steps": "num_inference_steps"}
"""Engine field name -> request field name, where they differ."""


class APIError(Exception):
    """An error response: HTTP status plus the fields of the OpenAI error object."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorResponse(error=ErrorObject(message=message, type=type, param=param, code=code))
        self.headers = headers

    @classmethod
    def invalid(cls, err: InvalidRequestError) -> APIError:
        """400 for a value the engine refused."""
        param = API_PARAM.get(err.field, err.field) if err.field else None
        message = str(err)
        if param is not None and not message.startswith(param):
            message = f"{param}: {message}"  # the engine's name for it (width, steps) is not the API's
        return cls(400, message, param=param, code="invalid_value")

    @classmethod
    def replica_lost(cls, err: Exception) -> APIError:
        """503 for images an engine replica lost (it failed or could not be reached): retry."""
        return cls(503, f"generation lost: {err}; retry it", type="server_error", code="replica_lost")

    @classmethod
    def queue_full(cls, message: str) -> APIError:
        headers = {"Retry-After": str(RETRY_AFTER_S)}
        return cls(429, message, type="rate_limit_error", code="queue_full", headers=headers)


def shutting_down() -> APIError:
    """503 for a request the server gave up on as it was forced to quit (retry elsewhere)."""
    message = "the server is shutting down and cancelled this request; retry it"
    return APIError(503, message, type="server_error", code="server_shutting_down")


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body.model_dump(), status_code=err.status, headers=err.headers)


def validation_error(errors: Sequence[Any]) -> APIError:
    """400 for the first problem pydantic found in the body (FastAPI would answer 422)."""
    first = dict(errors[0]) if errors else {}
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    kind = first.get("type", "")
    if kind == "json_invalid":
        detail = first.get("ctx", {}).get("error", "")
        return APIError(400, f"the request body is not valid JSON ({detail})", code="invalid_json")
    param = loc[0] if loc else None
    if param is None and isinstance(first.get("input"), bytes):  # not parsed as JSON: a form or text
        message = "the request body must be JSON: send it with Content-Type: application/json"
        return APIError(400, message, code="invalid_body")
    if param is None:
        return APIError(400, "the request body must be a JSON object with a prompt", code="invalid_body")
    if kind == "extra_forbidden":
        if param in OPENAI_UNSUPPORTED:
            message = f"parameter {shown(param)} of the OpenAI Images API is not supported by this server"
        else:
            message = f"unknown parameter {shown(param)}: this server does not accept it"
        return APIError(400, message, param=param, code="unknown_parameter")
    if kind == "missing":
        return APIError(400, f"{param} is required", param=param, code="missing_required_parameter")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if not message.startswith(param):
        message = f"{param}: {message}; got {shown(first.get('input'))}"
    return APIError(400, message, param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error the app can raise an OpenAI error object."""

    async def on_api_error(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, APIError)
        return error_response(err)

    async def on_validation(_: Request, err: Exception) -> JSONResponse:
        assert isinstance(err, RequestValidationError)
        return error_response(validation_error(err.errors()))

    async def on_http(_: Request, err: Exception) -> JSONResponse:
        # Unknown routes and wrong methods, which Starlette answers before any endpoint runs.
        assert isinstance(err, StarletteHTTPException)
        if err.status_code == 400:  # FastAPI could not decode the body (bad UTF-8, nesting too deep)
            message = f"the request body is not valid JSON in UTF-8 ({err.detail})"
            return error_response(APIError(400, message, code="invalid_json"))
        kind = "invalid_request_error" if err.status_code < 500 else "server_error"
        api = APIError(err.status_code, str(err.detail), type=kind, headers=err.headers)
        return error_response(api)

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
