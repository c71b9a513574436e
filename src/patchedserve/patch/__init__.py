"""Patched execution: exact operators over a CSP batch of mixed-resolution patches."""

from patchedserve.patch.model import PatchBatch, PatchedModel

__all__ = ["PatchBatch", "PatchedModel"]
