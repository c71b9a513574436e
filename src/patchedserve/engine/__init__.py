"""The serving engine: continuous batching of mixed-resolution requests over a patched model."""

from patchedserve.engine.config import EngineConfig
from patchedserve.engine.engine import Engine, QueueFullError
from patchedserve.engine.results import EngineObserver, GenerationResult

__all__ = ["Engine", "EngineConfig", "EngineObserver", "GenerationResult", "QueueFullError"]
