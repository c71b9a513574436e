"""What the HTTP server needs of whatever it serves: one ``Engine``, or a group of engine replicas.

``ServedEngine`` is the contract; ``Engine`` implements it in-process and
``cluster.ray_group.RayEngineGroup`` over engine replicas in Ray actors. ``ServedModel`` and
``CacheUsage`` are the plain values that cross it (they pickle, so a replica can send them).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

from patchedserve.engine.results import EngineObserver, GenerationResult
from patchedserve.models.bundle import GenerationDefaults
from patchedserve.request import GenerationRequest


@dataclass(frozen=True)
class ServedModel:
    """The served model as clients see it."""

    name: str
    """Model id (``GET /v1/models``)."""
    defaults: GenerationDefaults
    """What a request gets for each parameter it leaves out."""
    patch_size: int
    """Patch side in pixels; every image side must be a multiple of it."""

    @property
    def default_size(self) -> tuple[int, int]:
        """(width, height) of a request that gives no size: the model's default, each side rounded
        down to a multiple of the patch size (at least one patch)."""
        d, p = self.defaults, self.patch_size
        return max(p, d.width // p * p), max(p, d.height // p * p)


@dataclass(frozen=True)
class CacheUsage:
    """The patch-level block cache's counts since start (summed over replicas)."""

    patch_blocks: int = 0
    """Patch-block computations asked for."""
    reused: int = 0
    """Of those, served from the cache."""
    nbytes: int = 0
    """Memory the cache holds now."""

    @property
    def reuse_fraction(self) -> float:
        return self.reused / self.patch_blocks if self.patch_blocks else 0.0

    def __add__(self, other: CacheUsage) -> CacheUsage:
        return CacheUsage(
            self.patch_blocks + other.patch_blocks, self.reused + other.reused, self.nbytes + other.nbytes
        )


class ServedEngine(Protocol):
    """An engine (or group of engines) behind the server. Futures carry ``request_id``."""

    observers: list[EngineObserver]
    """Told of every step and every result (the server's Prometheus metrics)."""

    @property
    def served_model(self) -> ServedModel: ...

    @property
    def num_waiting(self) -> int:
        """Requests queued, not yet denoising."""
        ...

    @property
    def num_running(self) -> int:
        """Requests in the denoising batch."""
        ...

    @property
    def replicas_up(self) -> list[bool]:
        """Per engine replica (one for an in-process engine): whether it is up."""
        ...

    @property
    def has_patch_cache(self) -> bool: ...

    def patch_cache_usage(self) -> CacheUsage:
        """The patch cache's counts (zeros without one)."""
        ...

    def submit_many(self, gens: Sequence[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Queue all or none; raises ``InvalidRequestError`` or ``QueueFullError``."""
        ...

    def cancel(self, request_id: int) -> None: ...

    def start(self) -> None: ...

    def stop(self) -> None:
        """Stop serving; every request still held is answered (cancelled)."""
        ...
