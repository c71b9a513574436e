"""The HTTP server: an OpenAI-compatible Images API in front of one engine.

Modules: `schemas` (pydantic bodies), `errors` (OpenAI error objects, status mapping), `generation`
(one images request against the engine), `metrics` (Prometheus observer), `app` (`create_app`),
`commands` (``patchedserve serve``).
"""

from patchedserve.server.app import create_app

__all__ = ["create_app"]
