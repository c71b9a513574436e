"""Patched execution: exact operators over a CSP batch of mixed-resolution patches, and the
optional (approximate) patch-level block cache."""

from patchedserve.patch.cache import PatchCacheConfig
from patchedserve.patch.model import PatchBatch, PatchedModel

__all__ = ["PatchBatch", "PatchCacheConfig", "PatchedModel"]
