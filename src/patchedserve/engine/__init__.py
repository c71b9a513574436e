"""The serving engine: continuous batching of mixed-resolution requests over a patched model.

The names load on first use (`patchedserve._lazy`): code that needs only ``EngineConfig`` (the
simulator, the benchmark's system table) does without diffusers."""

from typing import TYPE_CHECKING

from patchedserve._lazy import lazy_exports

if TYPE_CHECKING:
    from patchedserve.engine.config import EngineConfig as EngineConfig
    from patchedserve.engine.engine import Engine as Engine
    from patchedserve.engine.engine import QueueFullError as QueueFullError
    from patchedserve.engine.results import EngineObserver as EngineObserver
    from patchedserve.engine.results import GenerationResult as GenerationResult

_MODULES = {
    "Engine": "engine",
    "EngineConfig": "config",
    "EngineObserver": "results",
    "GenerationResult": "results",
    "QueueFullError": "engine",
}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
