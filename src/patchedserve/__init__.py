"""PatchedServe: mixed-resolution, SLO-aware serving of text-to-image diffusion models.

``from patchedserve import Engine, GenerationRequest`` is the Python API; the names load lazily so
that ``import patchedserve`` does not pull in torch and diffusers. Nor does the CLI's parser
(`patchedserve._lazy`): ``patchedserve --help`` and usage errors answer in a fraction of a second,
and a command loads what it runs.
"""

from typing import TYPE_CHECKING

from patchedserve import _offline  # noqa: F401  (must run before diffusers/transformers load)
from patchedserve._lazy import lazy_exports

__version__ = "0.1.0"

if TYPE_CHECKING:
    from patchedserve.engine import Engine as Engine
    from patchedserve.engine import EngineConfig as EngineConfig
    from patchedserve.engine import GenerationResult as GenerationResult
    from patchedserve.request import GenerationRequest as GenerationRequest

_MODULES = {
    "Engine": "engine",
    "EngineConfig": "engine",
    "GenerationResult": "engine",
    "GenerationRequest": "request",
}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
