"""Patch-level block cache: reuse a block's output where its input barely changed since.

Before every cached block (U-Net down/mid/up blocks, SD3 transformer blocks), at every step, each
patch's block input is compared with the input the block last computed that patch from:

    change_i = ||x_i - x_i^cached||^2 / ||x_i^cached||^2

Below ``threshold`` (and fewer than ``max_reuse`` reuses in a row) the block's last computed output
is reused. Two granularities:

* ``image`` (default): the change is summed over each image's patches and an image reuses or
  recomputes as a whole; the block runs on the recomputed images as an exact batch of their own
  (``CSPLayout.subset``), so they see exact context.
* ``patch`` (the paper's design): each patch decides alone and the block runs on the *active*
  patches. Where a cross-patch operator inside the block needs a reused patch as context
  (GroupNorm statistics, a conv halo, self-attention keys and values), that patch's value from
  its last computation stands in: every such operator records its per-patch input (or keys and
  values) in a *site buffer* here, and reads the full-batch buffer with the active rows refreshed.

With the cache off the patched path is exact; with it on, output is approximate by design (the
paper's second component). Stored tensors remember the layout generation they were recorded in and
are carried to the current batch (``patch_index_map``) only when a reuse needs them; new requests
compute every block on their first step. Memory: one step's block inputs and outputs (and, per
patch, the site buffers) for the running batch.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from patchedserve.layout import CSPLayout
from patchedserve.patch.cache_parts import (
    ActiveSet,
    BlockSpec,
    BlockState,
    CacheStats,
    flatten,
    leaves,
    select_rows,
)
from patchedserve.patch.config import PatchCacheConfig

__all__ = ["ActiveSet", "BlockSpec", "CacheStats", "PatchCache", "PatchCacheConfig"]


@dataclass
class PatchCache:
    """Per-block cached inputs and outputs, and per-operator site buffers, for one running batch."""

    config: PatchCacheConfig
    layout: CSPLayout | None = None
    blocks: dict[str, BlockState] = field(default_factory=dict)
    sites: dict[tuple[int, str], tuple[torch.Tensor, int]] = field(default_factory=dict)
    """Operator inputs per (module id, tag): ``[N_gen, ...]`` and the generation recorded in."""
    stats: CacheStats = field(default_factory=CacheStats)
    gen: int = 0
    """Layout generation: increases at every composition change."""
    _maps: dict[int, torch.Tensor] = field(default_factory=dict)
    """Per older generation: each current patch's row in it ([N] long, -1 where new)."""
    _gathers: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """Per older generation: ``_maps`` as gather rows (new rows read row 0) and the new rows."""
    _layouts: dict[int, CSPLayout] = field(default_factory=dict)
    """The layout of each generation still referenced."""
    _contexts: OrderedDict[tuple[Any, ...], Any] = field(default_factory=OrderedDict)
    """Contexts of whole-image subsets (``granularity="image"``), least recently used first."""

    # ------------------------------------------------------------------ composition
    def prepare(self, layout: CSPLayout, device: torch.device) -> None:
        """Follow the batch to ``layout``: kept patches keep their cache, new ones start invalid.

        Stored tensors are not moved here (that would copy one forward's activations at every
        join or leave); each remembers the layout generation it was recorded in, and is gathered
        into the current layout only when a reuse needs it (``_current``).
        """
        old = self.layout
        self.layout = layout
        if old is None or (old.entry_ids == layout.entry_ids and old.sizes == layout.sizes):
            return
        index_host = layout.patch_index_map(old)
        old_size = dict(zip(old.entry_ids, old.sizes, strict=True))
        for i, (eid, size) in enumerate(zip(layout.entry_ids, layout.sizes, strict=True)):
            if old_size.get(eid, size) != size:  # same id, another image: nothing carries over
                index_host[layout.entry_offsets[i] : layout.entry_offsets[i + 1]] = -1
        index = torch.as_tensor(index_host, device=device)  # [N] row in the previous layout, or -1
        live = {g for _, g in self.sites.values()}
        live |= {g for st in self.blocks.values() for g in (st.gen, st.out_gen)}
        self._maps = {
            g: torch.where(index >= 0, m.index_select(0, index.clamp_min(0)), -1)
            for g, m in self._maps.items()
            if g in live
        }
        self._maps[self.gen] = index
        self._gathers = {g: (m.clamp_min(0), (m < 0).nonzero().squeeze(1)) for g, m in self._maps.items()}
        self._layouts = {g: lay for g, lay in self._layouts.items() if g in self._maps}
        self._layouts[self.gen] = old
        self.gen += 1
        for state in self.blocks.values():  # small flags move at once
            state.reused = self._current(state.reused, self.gen - 1)
            state.valid = self._current(state.valid, self.gen - 1)

    def _current_entries(self, t: torch.Tensor, gen: int) -> torch.Tensor:  # [R_gen, ...] -> [R, ...]
        """A per-entry tensor of generation ``gen`` in the current layout (zeros for new entries)."""
        if gen == self.gen:
            return t
        assert self.layout is not None
        first = torch.as_tensor(self.layout.entry_offsets[:-1], device=t.device)
        rows = self._maps[gen].index_select(0, first)  # [R] first patch's row in gen, or -1
        old_entry = torch.as_tensor(self._layouts[gen].patch_entry, device=t.device)
        kept = rows >= 0
        out = t.new_zeros((len(rows), *t.shape[1:]))
        out[kept] = t[old_entry[rows[kept]]]
        return out

    def _current(self, t: torch.Tensor, gen: int) -> torch.Tensor:  # [N_gen, ...] -> [N, ...]
        """``t``, recorded in layout generation ``gen``, in the current layout (zeros for new rows)."""
        if gen == self.gen:
            return t
        source, new = self._gathers[gen]
        out = t.index_select(0, source)  # one gather; new rows read row 0 and are zeroed below
        return out.index_fill_(0, new, 0) if new.numel() else out

    def nbytes(self) -> int:
        """Memory the cache holds: one step's block inputs, outputs and operator inputs."""
        # list() snapshots each dict in one call: /metrics reads this while the engine thread fills
        # or clears the cache, and iterating a dict that changes size raises
        blocks, sites = list(self.blocks.values()), list(self.sites.values())
        tensors = [t for st in blocks for t in (*st.inputs, *st.outputs) if t is not None]
        storages = {  # buffers are often shared (a block's output is the next block's input)
            t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
            for t in (*tensors, *(t for t, _ in sites))
        }
        return sum(storages.values())

    def clear(self) -> None:
        self.layout = None
        self.blocks.clear()
        self.sites.clear()
        self._maps.clear()
        self._gathers.clear()
        self._layouts.clear()
        self._contexts.clear()

    # ------------------------------------------------------------------ sites
    def site(self, key: tuple[int, str]) -> torch.Tensor:  # [N, ...]
        """The full-batch buffer an operator recorded at ``key`` (its last computed values), in the
        current layout; rows of patches new since then are zeros (they are always active)."""
        value, gen = self.sites[key]
        return self._current(value, gen)

    def record(self, key: tuple[int, str], value: torch.Tensor) -> None:
        self.sites[key] = (value, self.gen)

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
        watched = leaves([arguments.get(name) for name in spec.watch])
        state = self.blocks.get(key)
        reuse = None
        if state is not None and bool(state.valid.any()):
            if state.gen != self.gen:  # the batch changed since: bring the inputs along to compare
                state.inputs = [self._current(t, state.gen) for t in state.inputs]
                state.gen = self.gen
            reuse = self._decide(state, watched, ctx)
        self.stats.patch_blocks += n
        emb = None  # per-patch calls only: SD3's context stream needs every entry's conditioning
        if spec.entry_emb_from is not None and self.config.granularity == "patch":
            emb = arguments[spec.entry_emb_from].index_select(0, ctx.entry_first_patch)  # [R, E]
        if reuse is None or not bool(reuse.any()):
            if self.config.granularity == "image":  # whole images never need site buffers
                out = original(*bound.args, **bound.kwargs)
            else:
                active = ActiveSet(True, ctx.arange, ctx.arange_host, ctx.patch_entry, emb)
                out = self._call(ctx, active, original, bound)
            flat, rebuild = flatten(out)
            self.blocks[key] = BlockState(
                inputs=list(watched),
                outputs=flat,
                reused=torch.zeros(n, dtype=torch.int64, device=ctx.device),
                valid=torch.ones(n, dtype=torch.bool, device=ctx.device),
                gen=self.gen,
                out_gen=self.gen,
                rebuild=rebuild,
            )
            return rebuild(flat)
        assert state is not None
        self.stats.reused += int(reuse.sum())
        self._bring_outputs(state, spec)  # only now: a block that recomputes everything never needs them
        index = (~reuse).nonzero().squeeze(1)
        whole = self.config.granularity == "image"
        if index.numel() == 0 and (whole or not spec.per_entry_outputs):  # all reuse: skip the block
            state.reused += 1
            return state.rebuild(state.outputs)
        if whole:
            return self._run_images(state, spec, original, bound, ctx, reuse, index)
        for name in spec.per_patch:
            arguments[name] = select_rows(arguments.get(name), index)
        host = index.cpu().numpy()
        active = ActiveSet(False, index, host, ctx.patch_entry.index_select(0, index), emb)
        out = self._call(ctx, active, original, bound)
        flat, rebuild = flatten(out)
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
        state.valid = state.valid.index_fill(0, index, True)  # joiners computed here become reusable
        return rebuild(merged)

    def _bring_outputs(self, state: BlockState, spec: BlockSpec) -> None:
        """Carry a block's stored outputs to the current layout (after a join or leave)."""
        if state.out_gen == self.gen:
            return
        state.outputs = [
            None
            if t is None
            else self._current_entries(t, state.out_gen)
            if i in spec.per_entry_outputs
            else self._current(t, state.out_gen)
            for i, t in enumerate(state.outputs)
        ]
        state.out_gen = self.gen

    def _run_images(
        self,
        state: BlockState,
        spec: BlockSpec,
        original: Callable[..., Any],
        bound: inspect.BoundArguments,
        ctx: Any,
        reuse: torch.Tensor,  # [N] bool, whole images
        rows: torch.Tensor,  # [A] long, the patches of the images to compute
    ) -> Any:
        """Run the block on the images that do not reuse, as an exact batch of their own."""
        from patchedserve.patch.context import PatchContext, forward_context  # (import cycle)

        host = rows.cpu().numpy()
        positions = np.unique(ctx.layout.patch_entry[host])  # ascending layout positions
        entries = torch.as_tensor(positions, device=ctx.device)
        sub = ctx.layout.subset(positions.tolist())
        key = (sub.entry_ids, sub.sizes, str(ctx.device))
        sub_ctx = self._contexts.get(key)
        if sub_ctx is None:
            sub_ctx = self._contexts[key] = PatchContext.build(sub, ctx.device)
            if len(self._contexts) > 32:
                self._contexts.popitem(last=False)
        self._contexts.move_to_end(key)
        arguments = bound.arguments
        for name in spec.per_patch:
            arguments[name] = select_rows(arguments.get(name), rows)
        for name in spec.per_entry:
            arguments[name] = select_rows(arguments.get(name), entries)
        with forward_context(sub_ctx):
            out = original(*bound.args, **bound.kwargs)
        flat, rebuild = flatten(out)
        merged: list[torch.Tensor | None] = []
        for i, (new, old) in enumerate(zip(flat, state.outputs, strict=True)):
            if new is None or old is None:
                merged.append(new)
            else:
                at = entries if i in spec.per_entry_outputs else rows
                merged.append(old.index_copy(0, at, new.to(old.dtype)))
        watched = leaves([bound.arguments.get(name) for name in spec.watch])  # the computed rows
        state.outputs = merged
        state.inputs = [old.index_copy(0, rows, cur) for old, cur in zip(state.inputs, watched, strict=True)]
        state.reused = torch.where(reuse, state.reused + 1, torch.zeros_like(state.reused))
        state.valid = state.valid.index_fill(0, rows, True)
        return rebuild(merged)

    def _decide(self, state: BlockState, watched: Sequence[torch.Tensor], ctx: Any) -> torch.Tensor:  # [N]
        change = torch.zeros_like(state.reused, dtype=torch.float32)
        norm = torch.zeros_like(change)
        for cur, old in zip(watched, state.inputs, strict=True):  # fused reductions, one temporary
            dims = tuple(range(1, cur.dim()))
            change += torch.linalg.vector_norm(cur - old, dim=dims, dtype=torch.float32).square()
            norm += torch.linalg.vector_norm(old, dim=dims, dtype=torch.float32).square()
        if self.config.granularity == "image":  # the image's total change, for each of its patches
            entry = ctx.patch_entry
            change = change.new_zeros(ctx.num_entries).index_add_(0, entry, change)[entry]
            norm = norm.new_zeros(ctx.num_entries).index_add_(0, entry, norm)[entry]
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
