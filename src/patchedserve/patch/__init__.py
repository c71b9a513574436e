"""Patched execution: exact operators over a CSP batch of mixed-resolution patches, and the
optional (approximate) patch-level block cache. The names load on first use (`patchedserve._lazy`):
code that needs only ``PatchCacheConfig`` does without diffusers."""

from typing import TYPE_CHECKING

from patchedserve._lazy import lazy_exports

if TYPE_CHECKING:
    from patchedserve.patch.config import PatchCacheConfig as PatchCacheConfig
    from patchedserve.patch.model import PatchBatch as PatchBatch
    from patchedserve.patch.model import PatchedModel as PatchedModel

_MODULES = {"PatchBatch": "model", "PatchCacheConfig": "config", "PatchedModel": "model"}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
