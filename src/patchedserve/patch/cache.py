"""Patch-level block cache: reuse a block's output per patch where its input barely changed.

Before every cached block (U-Net down/mid/up blocks, SD3 transformer blocks), at every step, each
patch's block input is compared with the input the block last computed that patch from:

    change_i = ||x_i - x_i^cached||^2 / ||x_i^cached||^2

A patch whose change is below ``threshold`` (and that has not already reused this block
``max_reuse`` steps in a row) takes last computed output of the block; the block runs on the other
patches only (the *active set*). Where a cross-patch operator inside the block needs a reused patch
as context (GroupNorm statistics, a conv halo, self-attention keys and values), that patch's value
from its last computation stands in: every such operator records its per-patch input (or keys and
values) in a *site buffer* here, and reads the full-batch buffer with the active rows refreshed.

With the cache off the patched path is exact; with it on, output is approximate by design (the
paper's second component). Buffers follow the batch across composition changes with the layout's
``patch_index_map``; new requests compute every block on their first step.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchedserve.errors import InvalidRequestError
from patchedserve.layout import CSPLayout


@dataclass(frozen=True)
class PatchCacheConfig:
    """When a patch may reuse a block's output from an earlier step."""

    threshold: float = 0.05
    """Largest relative squared change of the block input (per patch) that still reuses."""
    max_reuse: int = 2
    """Most consecutive steps a patch may reuse one block before it must be recomputed."""

    def __post_init__(self) -> None:
        if not self.threshold >= 0:
            raise InvalidRequestError("patch cache threshold must be >= 0", field="patch_cache_threshold")
        if self.max_reuse < 1:
            raise InvalidRequestError(
                "patch cache max_reuse must be at least 1", field="patch_cache_max_reuse"
            )


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


@dataclass
class _BlockState:
    inputs: list[torch.Tensor]  # watched inputs, each [N, ...], as of each patch's last computation
    outputs: list[torch.Tensor | None]  # flattened outputs; per-patch leaves [N, ...]
    reused: torch.Tensor  # [N] int, consecutive reuses per patch
    valid: torch.Tensor  # [N] bool, the patch has a computed output here
    rebuild: Callable[[Sequence[torch.Tensor | None]], Any]  # leaves -> the block's output structure


@dataclass
class CacheStats:
    patch_blocks: int = 0
    reused: int = 0

    @property
    def reuse_fraction(self) -> float:
        return self.reused / self.patch_blocks if self.patch_blocks else 0.0


@dataclass
class PatchCache:
    """Per-block cached inputs and outputs, and per-operator site buffers, for one running batch."""

    config: PatchCacheConfig
    layout: CSPLayout | None = None
    blocks: dict[str, _BlockState] = field(default_factory=dict)
    sites: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)  # each [N, ...]
    stats: CacheStats = field(default_factory=CacheStats)

    # ------------------------------------------------------------------ composition
    def prepare(self, layout: CSPLayout, device: torch.device) -> None:
        """Carry every buffer to ``layout`` (kept patches move, new ones start invalid)."""
        old = self.layout
        self.layout = layout
        if old is None or (old.entry_ids == layout.entry_ids and old.sizes == layout.sizes):
            return
        index_host = layout.patch_index_map(old)
        old_size = dict(zip(old.entry_ids, old.sizes, strict=True))
        for i, (eid, size) in enumerate(zip(layout.entry_ids, layout.sizes, strict=True)):
            if old_size.get(eid, size) != size:  # same id, another image: nothing carries over
                index_host[layout.entry_offsets[i] : layout.entry_offsets[i + 1]] = -1
        index = torch.as_tensor(index_host, device=device)
        kept = (index >= 0).nonzero().squeeze(1)
        src = index[kept]

        def move(t: torch.Tensor) -> torch.Tensor:
            out = t.new_zeros((layout.num_patches, *t.shape[1:]))
            out[kept] = t[src]
            return out

        for state in self.blocks.values():
            state.inputs = [move(t) for t in state.inputs]
            state.outputs = [
                None if t is None or t.shape[0] != old.num_patches else move(t) for t in state.outputs
            ]
            state.reused = move(state.reused)
            state.valid = move(state.valid)
        self.sites = {k: move(t) for k, t in self.sites.items()}

    def clear(self) -> None:
        self.layout = None
        self.blocks.clear()
        self.sites.clear()

    # ------------------------------------------------------------------ sites
    def site(self, key: tuple[int, str]) -> torch.Tensor:
        """The full-batch buffer an operator recorded at ``key`` (its last computed values)."""
        return self.sites[key]

    def record(self, key: tuple[int, str], value: torch.Tensor) -> None:
        self.sites[key] = value

    # ------------------------------------------------------------------ blocks
    def run_block(
        self,
        key: str,
        spec: BlockSpec,
        original: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        ctx: Any,  # PatchContext (typed loosely to avoid an import cycle)
    ) -> Any:
        bound = spec.signature.bind(*args, **kwargs)
        arguments = bound.arguments
        n = ctx.num_patches
        watched = _leaves([arguments.get(name) for name in spec.watch])
        state = self.blocks.get(key)
        reuse = None if state is None else self._decide(state, watched)
        self.stats.patch_blocks += n
        emb = None
        if spec.entry_emb_from is not None:
            emb = arguments[spec.entry_emb_from].index_select(0, ctx.entry_first_patch)  # [R, E]
        if reuse is None or not bool(reuse.any()):
            active = ActiveSet(True, ctx.arange, ctx.arange_host, ctx.patch_entry, emb)
            out = self._call(ctx, active, original, bound)
            flat, rebuild = _flatten(out)
            self.blocks[key] = _BlockState(
                inputs=list(watched),
                outputs=flat,
                reused=torch.zeros(n, dtype=torch.int64, device=ctx.device),
                valid=torch.ones(n, dtype=torch.bool, device=ctx.device),
                rebuild=rebuild,
            )
            return rebuild(flat)
        assert state is not None
        self.stats.reused += int(reuse.sum())
        index = (~reuse).nonzero().squeeze(1)
        if index.numel() == 0 and not spec.per_entry_outputs:  # every patch reuses: skip the block
            state.reused += 1
            return state.rebuild(state.outputs)
        for name in spec.per_patch:
            arguments[name] = _select(arguments.get(name), index)
        host = index.cpu().numpy()
        active = ActiveSet(False, index, host, ctx.patch_entry.index_select(0, index), emb)
        out = self._call(ctx, active, original, bound)
        flat, rebuild = _flatten(out)
        merged: list[torch.Tensor | None] = []
        for i, (new, old) in enumerate(zip(flat, state.outputs, strict=True)):
            if i in spec.per_entry_outputs or new is None or old is None:
                merged.append(new)
            else:
                merged.append(old.index_copy(0, index, new.to(old.dtype)))  # [N, ...]
        state.outputs = merged
        state.inputs = [
            old.index_copy(0, index, cur.index_select(0, index))
            for old, cur in zip(state.inputs, watched, strict=True)
        ]
        state.reused = torch.where(reuse, state.reused + 1, torch.zeros_like(state.reused))
        return rebuild(merged)

    def _decide(self, state: _BlockState, watched: Sequence[torch.Tensor]) -> torch.Tensor:  # [N] bool
        change = torch.zeros_like(state.reused, dtype=torch.float32)
        norm = torch.zeros_like(change)
        for cur, old in zip(watched, state.inputs, strict=True):
            dims = tuple(range(1, cur.dim()))
            change += (cur.float() - old.float()).square().sum(dims)
            norm += old.float().square().sum(dims)
        relative = change / norm.clamp_min(1e-12)
        return state.valid & (relative < self.config.threshold) & (state.reused < self.config.max_reuse)

    @staticmethod
    def _call(
        ctx: Any, active: ActiveSet, original: Callable[..., Any], bound: inspect.BoundArguments
    ) -> Any:
        previous = ctx.active
        ctx.active = active
        try:
            return original(*bound.args, **bound.kwargs)
        finally:
            ctx.active = previous


def _select(value: Any, index: torch.Tensor) -> Any:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return value.index_select(0, index)
    return type(value)(_select(v, index) for v in value)


def _leaves(values: Sequence[Any]) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, tuple | list):
            out.extend(_leaves(list(v)))
    return out


def _flatten(out: Any) -> tuple[list[torch.Tensor | None], Callable[[Sequence[torch.Tensor | None]], Any]]:
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
