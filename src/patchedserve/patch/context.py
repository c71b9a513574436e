"""The one forward context that patched operators read their batch metadata from.

``PatchedModel`` builds a :class:`PatchContext` per batch composition (device copies of the CSP
layout plus lazily built stitch indices) and activates it around the wrapped model's forward with
:func:`forward_context`. Patched operators call :func:`get_forward_context`; when it returns
``None`` they behave exactly like the unwrapped diffusers module, so the model's own full-image
forward stays available as the correctness oracle.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from patchedserve.layout import AttentionGroup, CSPLayout
from patchedserve.patch.cache import ActiveSet, PatchCache
from patchedserve.patch.stitcher import GroupHaloIndex, HaloIndex, build_group_halo_index, build_halo_index

_state = threading.local()


class Stopwatch:
    """Accumulates wall time per named section (synchronising CUDA so GPU time is counted)."""

    def __init__(self) -> None:
        self.totals_s: dict[str, float] = {}

    @contextlib.contextmanager
    def section(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        try:
            yield
        finally:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.totals_s[name] = self.totals_s.get(name, 0.0) + time.perf_counter() - start


def timed(ctx: PatchContext, name: str) -> contextlib.AbstractContextManager[None]:
    """A section of ``ctx.stopwatch``, or a no-op when nothing is being timed."""
    if ctx.stopwatch is None:
        return contextlib.nullcontext()
    return ctx.stopwatch.section(name, ctx.device)


@dataclass
class PatchContext:
    """Device-side view of one :class:`CSPLayout`, shared by every patched operator of a forward."""

    layout: CSPLayout
    device: torch.device
    patch_entry: torch.Tensor  # [N] long, entry index of each patch
    entry_first_patch: torch.Tensor  # [R] long, first patch of each entry
    entry_average: torch.Tensor  # [N, N] float32, row n averages over the patches of n's entry
    groups: list[AttentionGroup]
    arange: torch.Tensor  # [N] long, 0..N-1 (the active set of a full block call)
    arange_host: np.ndarray  # [N] int64
    stopwatch: Stopwatch | None = None
    """Set by benchmarks to time the stitcher and regrouping; None (free) otherwise."""
    cache: PatchCache | None = None
    """The patch-level block cache of this forward (``PatchedModel`` sets it per call), or None."""
    active: ActiveSet | None = None
    """Inside a cached block: the patches it computes; None outside cached blocks."""
    _halo: dict[tuple[int, int], HaloIndex] = field(default_factory=dict, repr=False)
    _group_halo: dict[tuple[int, int], GroupHaloIndex] = field(default_factory=dict, repr=False)
    _extra: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, layout: CSPLayout, device: torch.device) -> PatchContext:
        return cls(
            layout=layout,
            device=device,
            patch_entry=torch.as_tensor(layout.patch_entry, device=device),
            entry_first_patch=torch.as_tensor(layout.entry_offsets[:-1], device=device),
            entry_average=torch.as_tensor(_entry_average(layout), device=device),
            groups=layout.attention_groups(),
            arange=torch.arange(layout.num_patches, device=device),
            arange_host=np.arange(layout.num_patches),
        )

    @property
    def num_patches(self) -> int:
        return self.layout.num_patches

    @property
    def num_entries(self) -> int:
        return self.layout.num_entries

    @property
    def subset(self) -> ActiveSet | None:
        """The active set when a cached block computes only some patches (None: all of them)."""
        active = self.active
        return None if active is None or active.full else active

    @property
    def records(self) -> bool:
        """Whether operators must keep their inputs for the patch cache (inside a cached block)."""
        return self.active is not None and self.cache is not None

    def recording(self, key: tuple[int, str], value: torch.Tensor) -> None:
        """Inside a cached block, keep an operator's full-batch input for later partial calls."""
        if self.active is not None and self.cache is not None:
            self.cache.record(key, value)

    def halo_index(self, side: int, halo: int) -> HaloIndex:
        """Stitch indices for patches of ``side`` pixels padded by ``halo`` (built once, then cached)."""
        key = (side, halo)
        if key not in self._halo:
            self._halo[key] = build_halo_index(self.layout, side, halo, self.device)
        return self._halo[key]

    def group_halo_index(self, side: int, halo: int) -> GroupHaloIndex:
        """:meth:`halo_index` split by attention group (built once, then cached)."""
        key = (side, halo)
        if key not in self._group_halo:
            self._group_halo[key] = build_group_halo_index(self.halo_index(side, halo), self.groups)
        return self._group_halo[key]

    def cached(self, key: str, build: object) -> torch.Tensor:
        """Memoise a per-composition tensor (e.g. SD3 position indices) under ``key``."""
        if key not in self._extra:
            assert callable(build)
            self._extra[key] = build()
        return self._extra[key]


def _entry_average(layout: CSPLayout) -> np.ndarray:  # [N, N] float32
    """Segment mean as a matrix: one small matmul instead of scatter/gather ops per GroupNorm."""
    same = layout.patch_entry[:, None] == layout.patch_entry[None, :]
    counts = np.diff(layout.entry_offsets)[layout.patch_entry].astype(np.float32)
    return (same / counts[:, None]).astype(np.float32)


def get_forward_context() -> PatchContext | None:
    """The active context, or ``None`` outside a patched forward."""
    return getattr(_state, "ctx", None)


@contextlib.contextmanager
def forward_context(ctx: PatchContext) -> Iterator[PatchContext]:
    """Activate ``ctx`` for the duration of one patched forward (thread-local, re-entrant safe)."""
    previous = get_forward_context()
    _state.ctx = ctx
    try:
        yield ctx
    finally:
        _state.ctx = previous
