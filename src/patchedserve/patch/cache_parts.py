"""The patch cache's plain parts: what a cached block records, and helpers that
take block arguments and outputs apart (nested tuples of tensors) and put them back together.

Used by ``patch.cache`` (the cache itself) and ``patch.wrap`` (which builds a ``BlockSpec`` per
block).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


@dataclass(frozen=True)
class ActiveSet:
    """The patches a block computes at this call; ``full`` when it computes all of them."""

    full: bool
    index: torch.Tensor  # [A] long, sorted patch indices
    host: np.ndarray  # [A] int64, the same on the host
    entry: torch.Tensor  # [A] long, entry of each active patch
    entry_emb: torch.Tensor | None = None  # [R, E] SD3: each entry's conditioning embedding


@dataclass(frozen=True)
class BlockSpec:
    """Which arguments of a block are per patch, which of them decide reuse, which outputs are per
    entry (SD3's context stream, always recomputed)."""

    signature: inspect.Signature
    per_patch: tuple[str, ...]
    watch: tuple[str, ...]
    per_entry_outputs: frozenset[int] = frozenset()
    entry_emb_from: str | None = None  # SD3: the per-patch argument whose entry rows condition context
    per_entry: tuple[str, ...] = ()  # per-entry arguments (text states), subset for whole-image calls


@dataclass
class BlockState:
    inputs: list[torch.Tensor]  # watched inputs, each [N, ...], as of each patch's last computation
    outputs: list[torch.Tensor | None]  # flattened outputs; per-patch leaves [N, ...]
    reused: torch.Tensor  # [N] int, consecutive reuses per patch
    valid: torch.Tensor  # [N] bool, the patch has a computed output here
    gen: int  # layout generation ``inputs`` are in (flags are always current)
    out_gen: int  # layout generation ``outputs`` are in (carried only when a reuse needs them)
    rebuild: Callable[[Sequence[torch.Tensor | None]], Any]  # leaves -> the block's output structure


@dataclass
class CacheStats:
    patch_blocks: int = 0
    reused: int = 0

    @property
    def reuse_fraction(self) -> float:
        return self.reused / self.patch_blocks if self.patch_blocks else 0.0


def select_rows(value: Any, index: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    return type(value)(select_rows(v, index) for v in value)


def leaves(values: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple | list):
            out.extend(leaves(list(v)))
    return out


def flatten(out: Any) -> tuple[list[torch.Tensor | None], Callable[[Sequence[torch.Tensor | None]], Any]]:
    """Leaves of a block output (tensor, None, or nested tuples) and a function that rebuilds it."""
    leaves: list[torch.Tensor | None] = []

    def shape_of(x: Any) -> Any:
        if isinstance(x, tuple | list):
            return tuple(shape_of(v) for v in x)
        leaves.append(x)
        return None

    structure = shape_of(out)

    def rebuild(values: Sequence[torch.Tensor | None]) -> Any:
        it = iter(values)

        def build(s: Any) -> Any:
            return next(it) if s is None else tuple(build(v) for v in s)

        return build(structure)

    return leaves, rebuild
