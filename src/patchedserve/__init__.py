"""PatchedServe: mixed-resolution, SLO-aware serving of text-to-image diffusion models."""

from patchedserve import _offline  # noqa: F401  (must run before diffusers/transformers load)

__version__ = "0.1.0"
