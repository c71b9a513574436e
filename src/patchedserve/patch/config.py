"""``PatchCacheConfig``: when the patch-level block cache reuses a block's output (off unless an
engine is given one). Plain data, without torch, so that ``EngineConfig`` and the CLI's parser can
read it; the cache itself is ``patch.cache``."""

from __future__ import annotations

from dataclasses import dataclass

from patchedserve.errors import InvalidRequestError


@dataclass(frozen=True)
class PatchCacheConfig:
    """When a patch may reuse a block's output from an earlier step."""

    threshold: float = 0.1
    """Largest relative squared change of the block input (per patch) that still reuses. 0.1 is the
    paper's default; on tiny-sdxl it kept PSNR >= 58 dB against the exact images
    (docs/benchmark-log.md, "Patch-level cache")."""
    max_reuse: int = 2
    """Most consecutive steps a patch may reuse one block before it must be recomputed."""
    granularity: str = "image"
    """``image``: a block reuses per image (every patch of it, decided on the image's total change)
    and recomputes whole images, which see exact context; ``patch``: per patch, with reused
    neighbours' last values standing in as context (the paper's design)."""

    def __post_init__(self) -> None:
        if self.granularity not in ("image", "patch"):
            raise InvalidRequestError("patch cache granularity must be image or patch", field="granularity")
        if not self.threshold >= 0:
            raise InvalidRequestError("patch cache threshold must be >= 0", field="patch_cache_threshold")
        if self.max_reuse < 1:
            raise InvalidRequestError(
                "patch cache max_reuse must be at least 1", field="patch_cache_max_reuse"
            )
