"""PatchedServe: mixed-resolution, SLO-aware serving of text-to-image diffusion models.

``from patchedserve import Engine, GenerationRequest`` is the Python API; the names load lazily so
that ``import patchedserve`` does not pull in torch and diffusers. (The CLI does: building its
parser imports every subcommand's module, about 10 s on a 2-core machine.)
"""

from typing import TYPE_CHECKING, Any

from patchedserve import _offline  # noqa: F401  (must run before diffusers/transformers load)

__version__ = "0.1.0"

if TYPE_CHECKING:
    from patchedserve.engine import Engine, EngineConfig, GenerationResult
    from patchedserve.request import GenerationRequest

_LAZY = {
    "Engine": "patchedserve.engine",
    "EngineConfig": "patchedserve.engine",
    "GenerationResult": "patchedserve.engine",
    "GenerationRequest": "patchedserve.request",
}

__all__ = ["Engine", "EngineConfig", "GenerationRequest", "GenerationResult"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'patchedserve' has no attribute {name!r}")
