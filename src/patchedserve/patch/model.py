"""``PatchedModel``: runs a diffusers denoiser over a CSP batch of mixed-resolution patches, exactly.

Two entry points:

* ``pm(latents=[...], timesteps=[...], ...)`` takes one entry per request, lays them out, runs one
  forward and returns one output per request in input order (tests, simple callers).
* ``pm.forward_batch(batch)`` takes a prebuilt :class:`PatchBatch` so the engine pays for the layout
  only when the composition changes, and keeps latents in patch form between steps.

A batch of one resolution needs nothing from patches: its images stack into one tensor, and the
model's own forward on it is the reference itself and cheaper than the patched operators (no
halos, no per-image regrouping; measured 6-22% faster on this CPU). So, unless the patch cache
is on or ``plain_single_resolution`` is off, such a batch is merged into images, run as they are,
and cut back into patches.

With ``streams`` > 1 (two by default on a multi-threaded CPU, see ``patchedserve.streams``), a
batch of several entries is shared out over that many parts of whole entries (``partition``: for
two streams the split whose slower part is predicted cheapest, which may take entries of one
resolution into both parts), and the parts are denoised side by side, each on its share of the
threads; the outputs go back in layout order. Every operator that mixes patches works per entry,
so this is exact too. Under the patch cache each stream keeps a cache of its own, and an entry always
goes to the same stream (``stream_of``), so its cached blocks stay where it runs.

Per-entry conditioning travels per entry (``[R, ...]``); timesteps and added conditions are
expanded to patches because the model's embedding layers run per sample. Used by the engine.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from torch import nn

from patchedserve.errors import InvalidRequestError
from patchedserve.layout import CSPLayout, merge_patches, split_latents
from patchedserve.patch.cache import CacheStats, PatchCache, PatchCacheConfig
from patchedserve.patch.context import PatchContext, forward_context
from patchedserve.patch.partition import stream_parts
from patchedserve.patch.wrap import wrap_sd3, wrap_unet
from patchedserve.streams import resolve_streams, run_parts


@dataclass
class PatchBatch:
    """One model call's inputs, in layout order (R entries, N patches)."""

    layout: CSPLayout
    patches: torch.Tensor  # [N, C, p, p]
    timesteps: torch.Tensor  # [R]
    encoder_hidden_states: torch.Tensor  # [R, L, D]
    pooled: torch.Tensor | None = None  # [R, Dp] SDXL text_embeds / SD3 pooled_projections
    time_ids: torch.Tensor | None = None  # [R, 6] SDXL only


class PatchedModel:
    """Wraps a UNet2DConditionModel or SD3Transformer2DModel for patched execution (in place)."""

    def __init__(
        self,
        model: nn.Module,
        patch_size: int = 256,
        vae_scale_factor: int = 8,
        context_cache_size: int = 32,
        max_patches_per_call: int | None = None,
        cache: PatchCacheConfig | None = None,
        plain_single_resolution: bool = True,
        streams: int | None = None,
    ) -> None:
        self.model: Any = model  # a diffusers denoiser (untyped for mypy)
        self.is_sd3 = isinstance(model, SD3Transformer2DModel)
        self.unit = self.min_patch_size(model, vae_scale_factor)
        if patch_size <= 0 or patch_size % self.unit:
            raise InvalidRequestError(
                f"patch size {patch_size} px does not suit this model: it must be a positive multiple of "
                f"{self.unit} px (vae factor {vae_scale_factor} x the denoiser's downsampling)",
                field="patch_size",
            )
        self.patch_size = patch_size
        self.vae_scale_factor = vae_scale_factor
        self.latent_patch = patch_size // vae_scale_factor
        if self.is_sd3:
            wrap_sd3(model)
        else:
            wrap_unet(model)
        if cache is not None and max_patches_per_call is not None:
            raise InvalidRequestError(
                "the patch cache needs whole-batch calls; leave max_patches_per_call unset",
                field="patch_cache",
            )
        self.max_patches_per_call = max_patches_per_call
        self.streams = resolve_streams(streams, next(model.parameters()).device)
        """Parts of a batch denoised side by side (``patchedserve.streams``)."""
        self.cache = None if cache is None else PatchCache(cache)
        """Patch-level block cache (approximate); carried across calls, so one batch per model. It
        follows entries by id: with the list API ids are input positions, so keep each request at
        the same position from call to call (``forward_batch`` takes the caller's ids). With
        several streams this is stream 0's; ``caches`` lists all."""
        self._stream_caches = [] if cache is None else [PatchCache(cache) for _ in range(self.streams - 1)]
        self.plain_single_resolution = plain_single_resolution and cache is None
        """Run one-resolution batches as whole images through the model's own forward."""
        self._contexts: OrderedDict[tuple, PatchContext] = OrderedDict()
        self._contexts_lock = threading.Lock()  # streams build contexts concurrently
        self._cache_size = context_cache_size

    @staticmethod
    def min_patch_size(model: torch.nn.Module, vae_scale_factor: int = 8) -> int:
        """Smallest legal patch side in image pixels for this denoiser."""
        config: Any = getattr(model, "config", None)
        if isinstance(model, SD3Transformer2DModel):
            return vae_scale_factor * int(config.patch_size)
        if isinstance(model, UNet2DConditionModel):
            blocks: Any = model.get_submodule("down_blocks")
            downs = sum(1 for b in blocks if getattr(b, "downsamplers", None))
            return vae_scale_factor * 2**downs
        raise TypeError(f"unsupported denoiser {type(model).__name__}")

    # ------------------------------------------------------------------ layout
    def layout_for(
        self, sizes_px: Sequence[tuple[int, int]], entry_ids: Sequence[int] | None = None
    ) -> CSPLayout:
        """CSP layout for images of the given pixel sizes (height, width)."""
        latent = []
        for h, w in sizes_px:
            if h <= 0 or w <= 0 or h % self.patch_size or w % self.patch_size:
                raise InvalidRequestError(
                    f"size {w}x{h} is not a multiple of the patch size {self.patch_size} px; allowed sizes "
                    f"are multiples of {self.patch_size} in both width and height",
                    field="size",
                )
            latent.append((h // self.vae_scale_factor, w // self.vae_scale_factor))
        return CSPLayout.build(latent, self.latent_patch, entry_ids)

    def context(self, layout: CSPLayout, device: torch.device) -> PatchContext:
        """Device metadata for ``layout``, cached per composition (LRU)."""
        key = (layout.sizes, layout.entry_ids, str(device))
        with self._contexts_lock:
            ctx = self._contexts.get(key)
            if ctx is not None:
                self._contexts.move_to_end(key)
                return ctx
        ctx = PatchContext.build(layout, device)
        with self._contexts_lock:
            self._contexts[key] = ctx
            if len(self._contexts) > self._cache_size:
                self._contexts.popitem(last=False)
        return ctx

    # ------------------------------------------------------------------ forward
    @torch.no_grad()
    def forward_batch(self, batch: PatchBatch) -> torch.Tensor:  # [N, C_out, p, p]
        """One denoiser step over the batch: in ``streams`` parts side by side, each (with
        ``max_patches_per_call``) in chunks of whole entries (keeps the working set in cache on
        CPUs; every entry still sees its whole image)."""
        layout = batch.layout
        if self.cache is not None and self.streams > 1:
            return self._forward_cached_streams(batch)
        parts = stream_parts(layout, self.streams)
        if len(parts) == 1:
            return self._forward_chunks(batch)
        outs = run_parts(lambda positions: self._forward_chunks(sub_batch(batch, positions)), parts)
        return _gather_parts(layout, parts, outs)

    def _forward_cached_streams(self, batch: PatchBatch) -> torch.Tensor:  # [N, C_out, p, p]
        """Each stream denoises its own entries (``stream_of``) with its own patch cache."""
        layout, caches = batch.layout, self.caches
        owners = [self.stream_of(e) for e in layout.entry_ids]
        streams = [k for k in range(self.streams) if k in owners]
        parts = [[i for i, o in enumerate(owners) if o == k] for k in streams]
        work = list(zip(streams, parts, strict=True))
        outs = run_parts(lambda part: self._forward(sub_batch(batch, part[1]), caches[part[0]]), work)
        return _gather_parts(layout, parts, outs)

    def stream_of(self, entry_id: int) -> int:
        """The stream an entry always runs on under the patch cache: the engine's entry ids are
        ``2 * request + branch``, so a request's two CFG branches go to different streams."""
        return (entry_id // 2 + entry_id % 2) % self.streams

    @property
    def caches(self) -> list[PatchCache]:
        """Every stream's patch cache (empty without the cache)."""
        return [] if self.cache is None else [self.cache, *self._stream_caches]

    def clear_cache(self) -> None:
        """Drop everything the patch caches hold (idle: nothing left to reuse)."""
        for cache in self.caches:
            cache.clear()

    def cache_stats(self) -> CacheStats:
        """Reuse counts summed over the streams' caches."""
        caches = self.caches
        return CacheStats(sum(c.stats.patch_blocks for c in caches), sum(c.stats.reused for c in caches))

    def cache_nbytes(self) -> int:
        return sum(c.nbytes() for c in self.caches)

    def _forward_chunks(self, batch: PatchBatch) -> torch.Tensor:  # [N, C_out, p, p]
        limit = self.max_patches_per_call
        if limit is None or batch.layout.num_patches <= limit:
            return self._forward(batch, self.cache)
        return torch.cat([self._forward(part, self.cache) for part in split_batch(batch, limit)])

    def _forward(self, batch: PatchBatch, cache: PatchCache | None) -> torch.Tensor:  # [N, C_out, p, p]
        layout = batch.layout
        if self.plain_single_resolution and len(layout.resolution_offsets) == 2:
            images = torch.stack(merge_patches(batch.patches, layout))  # [R, C, h, w]
            t = batch.timesteps.to(images.device)  # [R]
            out = self._denoise(images, t, batch.encoder_hidden_states, batch.pooled, batch.time_ids)
            return split_latents(out.unbind(0), layout)
        x = batch.patches
        ctx = self.context(layout, x.device)
        per_patch = ctx.patch_entry
        t = batch.timesteps.to(x.device)[per_patch]  # [N]
        if cache is not None:
            cache.prepare(layout, x.device)
        ctx.cache = cache
        pooled = None if batch.pooled is None else batch.pooled[per_patch]  # [N, Dp]
        time_ids = None if batch.time_ids is None else batch.time_ids[per_patch]  # [N, 6]
        with forward_context(ctx), _detach_cache(ctx):
            return self._denoise(x, t, batch.encoder_hidden_states, pooled, time_ids)

    def _denoise(
        self,
        x: torch.Tensor,  # [B, C, h, w]: patches (in a forward context) or whole images
        t: torch.Tensor,  # [B]
        encoder_hidden_states: torch.Tensor,  # [R, L, D], one per entry
        pooled: torch.Tensor | None,  # [B, Dp]
        time_ids: torch.Tensor | None,  # [B, 6]
    ) -> torch.Tensor:  # [B, C_out, h, w]
        """One call of the denoiser with its family's arguments."""
        if self.is_sd3:
            if pooled is None:
                raise ValueError("SD3 needs pooled projections")
            return self.model(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled,
                return_dict=False,
            )[0]
        added = None if time_ids is None or pooled is None else {"text_embeds": pooled, "time_ids": time_ids}
        return self.model(
            x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]

    def __call__(
        self,
        latents: Sequence[torch.Tensor],  # each [C, h, w]
        timesteps: Sequence[float | int | torch.Tensor],
        encoder_hidden_states: Sequence[torch.Tensor],  # each [L, D]
        added_cond_kwargs: Sequence[Mapping[str, torch.Tensor]] | None = None,  # SDXL: text_embeds, time_ids
        pooled_projections: Sequence[torch.Tensor] | None = None,  # SD3: each [Dp]
    ) -> list[torch.Tensor]:  # each [C_out, h, w], input order
        n = len(latents)
        for name, seq in (("timesteps", timesteps), ("encoder_hidden_states", encoder_hidden_states)):
            if len(seq) != n:
                raise ValueError(f"{name} has {len(seq)} entries for {n} latents")
        sizes = [
            (int(x.shape[-2]) * self.vae_scale_factor, int(x.shape[-1]) * self.vae_scale_factor)
            for x in latents
        ]
        layout = self.layout_for(sizes)
        order = list(layout.entry_ids)
        dev = latents[0].device
        batch = PatchBatch(
            layout=layout,
            patches=split_latents([latents[i] for i in order], layout),
            timesteps=torch.stack([torch.as_tensor(timesteps[i], dtype=torch.float32) for i in order]).to(
                dev
            ),
            encoder_hidden_states=torch.stack([encoder_hidden_states[i] for i in order]),
        )
        if pooled_projections is not None:
            batch.pooled = torch.stack([pooled_projections[i] for i in order])
        if added_cond_kwargs is not None:
            batch.pooled = torch.stack([added_cond_kwargs[i]["text_embeds"] for i in order])
            batch.time_ids = torch.stack([added_cond_kwargs[i]["time_ids"] for i in order])
        outs = merge_patches(self.forward_batch(batch), layout)
        result: list[torch.Tensor] = [torch.empty(0)] * n
        for pos, i in enumerate(order):
            result[i] = outs[pos]
        return result


@contextlib.contextmanager
def _detach_cache(ctx: PatchContext) -> Iterator[None]:
    """Unset the context's cache after the call (contexts are shared across calls)."""
    try:
        yield
    finally:
        ctx.cache = None


def split_batch(batch: PatchBatch, max_patches: int) -> list[PatchBatch]:
    """Consecutive runs of whole entries with at most ``max_patches`` patches each (an entry
    larger than the limit forms its own run)."""
    layout, parts, start = batch.layout, [], 0
    offsets = layout.entry_offsets
    while start < layout.num_entries:
        end = start + 1
        while end < layout.num_entries and offsets[end + 1] - offsets[start] <= max_patches:
            end += 1
        parts.append(sub_batch(batch, range(start, end)))
        start = end
    return parts


def _gather_parts(
    layout: CSPLayout, parts: Sequence[Sequence[int]], outs: Sequence[torch.Tensor]
) -> torch.Tensor:  # [N, C_out, p, p]
    """The outputs of parts (entry positions of each, ascending) back in layout order."""
    if len(outs) == 1:
        return outs[0]
    flat = [i for part in parts for i in part]
    if flat == list(range(layout.num_entries)):  # contiguous runs in order
        return torch.cat(list(outs))
    out = outs[0].new_empty((layout.num_patches, *outs[0].shape[1:]))
    for positions, part_out in zip(parts, outs, strict=True):
        out[torch.as_tensor(entry_rows(layout, positions), device=out.device)] = part_out
    return out


def entry_rows(layout: CSPLayout, positions: Sequence[int]) -> np.ndarray:  # [n] patch rows
    """The patch rows of the entries at ``positions``, concatenated in that order."""
    offsets = layout.entry_offsets
    return np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in positions])


def sub_batch(batch: PatchBatch, positions: Sequence[int]) -> PatchBatch:
    """The entries at these layout positions (ascending) as a batch of their own; a run of
    consecutive positions is cut out as views."""
    layout = batch.layout
    sub = layout.subset(positions)
    index: slice | torch.Tensor
    if len(positions) and positions[-1] - positions[0] == len(positions) - 1:
        a, b = positions[0], positions[-1] + 1
        pa, pb = int(layout.entry_offsets[a]), int(layout.entry_offsets[b])
        patches, index = batch.patches[pa:pb], slice(a, b)
    else:
        rows = torch.as_tensor(entry_rows(layout, positions), device=batch.patches.device)
        patches = batch.patches.index_select(0, rows)
        index = torch.as_tensor(list(positions), device=batch.patches.device)

    def rows_of(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t[index]

    return PatchBatch(
        sub,
        patches,
        batch.timesteps[index],
        batch.encoder_hidden_states[index],
        rows_of(batch.pooled),
        rows_of(batch.time_ids),
    )
