"""Patch-aware GroupNorm with per-image statistics, optionally emitting the next conv's halo.

GroupNorm is blind to where a pixel sits, so an image's statistics are those of the bag of all its
patches' pixels. In a channels-last batch the pixels of one patch are one contiguous block of
``[side*side, C]`` rows, and an entry's patches are adjacent in the CSP layout, so an entry is one
contiguous block too: viewed as a channels-last image ``[1, C, k*side, side]`` (its k patches
stacked), it is normalised by the native kernel with the model's own affine, exactly as
``nn.GroupNorm`` normalises the full image. Entries with equal patch counts are contiguous (the
attention groups), so one native call per group covers a whole batch. Inputs that arrive NCHW are
made channels-last first (one copy); the output is channels-last either way. CUDA's GroupNorm
kernel takes NCHW input only, so on a GPU each group is normalised from a contiguous copy (and its
output made channels-last again).

When GroupNorm feeds a convolution through an activation with ``act(0) == 0`` (ResNet blocks,
``conv_norm_out``), the norm returns the padded patches: each group's normalised pixels are
gathered straight into that group's block of the padded batch and the off-image border is zeroed
(``stitcher.gather_groups``), so the halo costs one pass and the conv skips its own gather (the
activation maps the zero border to zero). The gather reads each group's kernel output in place;
without a halo the groups are joined with one copy (none for a single group).

The patch cache keeps each patch's own statistics so that partial calls can mix fresh and stored
patches; while it records (and in its partial calls) the statistics come per patch from the native
kernel and are combined over each entry with the parallel-variance formula (patches of an entry
have equal counts), then the patch-normalised output is re-based onto them with one per-channel
multiply-add. (``torch.var_mean`` would be the obvious way to get the statistics but is an order
of magnitude slower than the GroupNorm kernel on CPU.) Installed by ``PatchedModel``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from patchedserve.patch.context import PatchContext, get_forward_context, timed
from patchedserve.patch.hooks import set_patched_forward
from patchedserve.patch.stitcher import (
    gather_from_buffer,
    gather_groups,
    gather_rows_from_buffer,
    pixel_buffer,
    refreshed_buffer,
)


def _per_channel(v: torch.Tensor, channels: int) -> torch.Tensor:  # [N, G] -> [N, C]
    return v.repeat_interleave(channels // v.shape[1], dim=1)


def native_takes_channels_last(device: torch.device) -> bool:
    """Whether ``aten.native_group_norm`` takes channels-last input on ``device``: the CPU kernel
    does; the CUDA one asks for NCHW-contiguous input (torch 2.11), so there the norms normalise a
    contiguous copy."""
    return device.type == "cpu"


def patch_stats(
    norm: nn.GroupNorm, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # out0 [N, C, ...]; mean, rstd [N, G] float32
    """Each patch normalised with its own statistics (no affine), and those statistics."""
    n, c = x.shape[:2]
    if not native_takes_channels_last(x.device):
        x = x.contiguous()
    out0, mean, rstd = torch.ops.aten.native_group_norm(
        x, None, None, n, c, x[0, 0].numel(), norm.num_groups, norm.eps
    )
    return out0, mean.float().view(n, -1), rstd.float().view(n, -1)


def entry_stats(
    mean_p: torch.Tensor, rstd_p: torch.Tensor, eps: float, ctx: PatchContext
) -> tuple[torch.Tensor, torch.Tensor]:  # mean, rstd of each patch's entry: [N, G]
    """Combine per-patch statistics over each entry (parallel variance, equal counts per patch)."""
    var_p = rstd_p.pow(-2) - eps
    average = ctx.entry_average  # [N, N]: mean over the patches of the row patch's entry
    mean_e = average @ mean_p
    var_e = average @ ((mean_p - mean_e).square_() + var_p)
    return mean_e, torch.rsqrt(var_e.clamp_min_(0) + eps)


def _weight_bias(norm: nn.GroupNorm, c: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if norm.affine:
        return norm.weight.float(), norm.bias.float()
    return torch.ones(c, device=device), torch.zeros(c, device=device)


def patch_group_norm(norm: nn.GroupNorm, emit_halo: int = 0) -> None:
    """Install per-image GroupNorm on ``norm``; ``emit_halo`` > 0 pads its output for the next conv."""

    def forward(original: Any, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, ...]
        ctx = get_forward_context()
        if ctx is None:
            return original(x)
        if ctx.subset is not None:
            return _partial(norm, x, ctx, emit_halo)
        if x.dim() == 4 and not ctx.records:
            return _whole_entries(norm, x, ctx, emit_halo)
        n, c = x.shape[:2]
        view = (n, c) + (1,) * (x.dim() - 2)
        out0, mean_p, rstd_p = patch_stats(norm, x)
        ctx.recording((id(norm), "mean"), mean_p)
        ctx.recording((id(norm), "rstd"), rstd_p)
        mean_e, rstd_e = entry_stats(mean_p, rstd_p, norm.eps, ctx)
        w, b = _weight_bias(norm, c, x.device)
        # Re-base the patch-normalised output onto the entry statistics (and apply the affine).
        scale = (_per_channel(rstd_e / rstd_p, c) * w).view(view).to(x.dtype)
        shift = (_per_channel((mean_p - mean_e) * rstd_e, c) * w + b).view(view).to(x.dtype)
        if not emit_halo:
            return torch.addcmul(shift, out0, scale)
        # Fused halo: normalise into a pixel buffer with a zero row, then one gather builds every
        # padded patch (neighbours' normalised borders, zeros at the image border).
        buf, normed = pixel_buffer(n, c, x.shape[-1], x)
        torch.addcmul(shift, out0, scale, out=normed)
        ctx.recording((id(norm), "out"), normed)
        with timed(ctx, "stitch"):
            return gather_from_buffer(buf, n, ctx.halo_index(x.shape[-1], emit_halo))  # [N, C, p+2h, p+2h]

    set_patched_forward(norm, forward)


def entry_norms(norm: nn.GroupNorm, x: torch.Tensor, ctx: PatchContext) -> list[torch.Tensor]:
    """Normalise every entry of ``x`` [N, C, side, side] (channels-last) over its whole image: one
    native call per attention group, returning each group's pixels as rows ``[N_g*side*side, C]``
    (views of the kernel's own output on the CPU). The kernel has no true ``out=`` variant (its
    ``.out`` computes into a temporary and copies), so the callers place the groups themselves."""
    n, c, side = x.shape[0], x.shape[1], x.shape[-1]
    area = side * side
    pixels = x.permute(0, 2, 3, 1).reshape(n * area, c)  # [N*side*side, C], a view
    weight, bias = (norm.weight, norm.bias) if norm.affine else (None, None)
    parts = []
    for g in ctx.groups:
        rows, k = g.num_entries, g.patches_per_entry
        src = pixels[g.patch_start * area : g.patch_end * area].view(rows, k * side, side, c)
        src = src.permute(0, 3, 1, 2)  # [R_g, C, k*side, side], channels-last
        if not native_takes_channels_last(x.device):
            src = src.contiguous()
        normed = torch.ops.aten.native_group_norm(
            src, weight, bias, rows, c, k * area, norm.num_groups, norm.eps
        )[0]  # [R_g, C, k*side, side]
        parts.append(normed.permute(0, 2, 3, 1).reshape(-1, c))
    return parts


def _whole_entries(norm: nn.GroupNorm, x: torch.Tensor, ctx: PatchContext, emit_halo: int) -> torch.Tensor:
    """Per-image GroupNorm of a full batch ``x`` [N, C, side, side]; channels-last output
    ([N, C, side + 2*emit_halo, ...] padded patches when ``emit_halo``)."""
    x = x.contiguous(memory_format=torch.channels_last)
    n, c, side = x.shape[0], x.shape[1], x.shape[-1]
    parts = entry_norms(norm, x, ctx)
    if emit_halo:
        with timed(ctx, "stitch"):
            return gather_groups(parts, ctx.group_halo_index(side, emit_halo), n)  # [N, C, p+2h, p+2h]
    rows = parts[0] if len(parts) == 1 else torch.cat(parts)  # [N*side*side, C]
    return rows.view(n, side, side, c).permute(0, 3, 1, 2)


def _partial(norm: nn.GroupNorm, x: torch.Tensor, ctx: PatchContext, emit_halo: int) -> torch.Tensor:
    """GroupNorm of the active patches ``x`` [A, C, ...] (patch cache): image statistics combine
    the active patches' fresh statistics with the others' last computed ones."""
    active = ctx.subset
    assert active is not None and ctx.cache is not None
    a, c = x.shape[:2]
    view = (a, c) + (1,) * (x.dim() - 2)
    out0, mean_a, rstd_a = patch_stats(norm, x)
    key = id(norm)
    mean_p = ctx.cache.site((key, "mean")).index_copy(0, active.index, mean_a)  # [N, G]
    rstd_p = ctx.cache.site((key, "rstd")).index_copy(0, active.index, rstd_a)
    ctx.cache.record((key, "mean"), mean_p)
    ctx.cache.record((key, "rstd"), rstd_p)
    mean_e, rstd_e = (t.index_select(0, active.index) for t in entry_stats(mean_p, rstd_p, norm.eps, ctx))
    w, b = _weight_bias(norm, c, x.device)
    scale = (_per_channel(rstd_e / rstd_a, c) * w).view(view).to(x.dtype)
    shift = (_per_channel((mean_a - mean_e) * rstd_e, c) * w + b).view(view).to(x.dtype)
    normed = torch.addcmul(shift, out0, scale)  # [A, C, ...]
    if not emit_halo:
        return normed
    buf, full = refreshed_buffer(ctx.cache.site((key, "out")), active.index, normed)
    ctx.cache.record((key, "out"), full)
    with timed(ctx, "stitch"):
        return gather_rows_from_buffer(buf, ctx.halo_index(x.shape[-1], emit_halo), active.index)
