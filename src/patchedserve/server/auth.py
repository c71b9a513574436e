"""API keys: with ``serve --api-key`` (or ``PATCHEDSERVE_API_KEY``) every ``/v1`` route asks for
``Authorization: Bearer <key>``, as the OpenAI clients send it.

``/health`` and ``/metrics`` stay open, for load balancers' probes and Prometheus scrapes, and
show no request's content. A missing or wrong key is a 401 OpenAI error object (code
``invalid_api_key``, which the openai client raises as ``AuthenticationError``), answered by
`ApiKeyGate` before the body is read or checked. Keys are compared in constant time.
"""

# No ``from __future__ import annotations``: FastAPI reads the dependency's annotation at runtime,
# and as a string it could not see the closure's ``bearer``.

import hmac
import os
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.types import ASGIApp, Receive, Scope, Send

from patchedserve.errors import InvalidRequestError
from patchedserve.server.errors import APIError, error_response

API_KEY_ENV = "PATCHEDSERVE_API_KEY"
"""The environment variable ``serve`` reads the key from when ``--api-key`` is not given."""


def resolve_api_key(flag: str | None) -> str | None:
    """The key to require: ``--api-key`` if given, else ``$PATCHEDSERVE_API_KEY`` if set and not
    empty, else None (no key: every route is open)."""
    if flag is not None:
        if not flag.strip():
            raise InvalidRequestError("--api-key must not be empty", field="api_key")
        return flag
    return os.environ.get(API_KEY_ENV) or None


def unauthorized(message: str) -> APIError:
    return APIError(401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def key_error(authorization: str | None, expected: bytes) -> APIError | None:
    """The 401 for an ``Authorization`` header that does not carry ``Bearer <expected>``, else None."""
    scheme, _, token = (authorization or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return unauthorized("this server needs an API key: send it as Authorization: Bearer <key>")
    if not hmac.compare_digest(token.strip().encode(), expected):
        return unauthorized("the API key is not this server's")
    return None


class ApiKeyGate:
    """ASGI middleware: a ``/v1`` request without the key gets its 401 before anything reads the
    body (FastAPI parses a body before it runs a route's dependencies)."""

    def __init__(self, app: ASGIApp, api_key: str, prefix: str = "/v1") -> None:
        self.app = app
        self.expected = api_key.encode()
        self.prefix = prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == self.prefix or path.startswith(self.prefix + "/"):
            header = dict(scope["headers"]).get(b"authorization")
            error = key_error(None if header is None else header.decode("latin-1"), self.expected)
            if error is not None:
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def require_api_key(api_key: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency that refuses a request without ``Authorization: Bearer <api_key>``.
    `ApiKeyGate` answers such requests first; the dependency puts the scheme on the OpenAPI page
    (its Authorize button) and guards a route should the gate be left out."""
    expected = api_key.encode()
    bearer = HTTPBearer(auto_error=False, description="the key the server was started with")

    async def check(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        header = None if credentials is None else f"{credentials.scheme} {credentials.credentials}"
        error = key_error(header, expected)
        if error is not None:
            raise error

    return check
