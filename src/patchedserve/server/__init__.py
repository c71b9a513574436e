"""The HTTP server: an OpenAI-compatible Images API in front of one engine.

Modules: `schemas` (pydantic bodies), `errors` (OpenAI error objects, status mapping), `generation`
(one images request against the engine), `metrics` (Prometheus observer), `app` (`create_app`),
`http` (uvicorn and the start-up banner), `commands` (``patchedserve serve``'s options). The HTTP
stack loads on first use of `create_app`, so the CLI's other commands do without it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from patchedserve.server.app import create_app

__all__ = ["create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from patchedserve.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
