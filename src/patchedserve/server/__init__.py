"""The HTTP server: an OpenAI-compatible Images API in front of a served engine.

Modules: `schemas` (pydantic bodies), `errors` (OpenAI error objects, status mapping), `generation`
(one images request against the engine), `metrics` (Prometheus observer), `app` (`create_app`),
`http` (uvicorn and the start-up banner), `commands` (``patchedserve serve``'s options). The HTTP
stack loads on first use of `create_app` (`patchedserve._lazy`), so the CLI's other commands do without it.
"""

from typing import TYPE_CHECKING

from patchedserve._lazy import lazy_exports

if TYPE_CHECKING:
    from patchedserve.server.app import create_app as create_app

_MODULES = {"create_app": "app"}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
