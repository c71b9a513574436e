"""Patch-aware GroupNorm with per-image statistics, optionally emitting the next conv's halo.

Statistics are reduced over all patches of the same entry: each patch contributes its own mean
and (biased) variance over ``C/G * p * p`` values, and the per-entry figures are combined with the
parallel-variance formula (equal counts per patch), so the result means exactly what
``nn.GroupNorm`` means on the full image, without the cancellation of ``E[x^2] - E[x]^2``.

When GroupNorm feeds a convolution through an activation with ``act(0) == 0`` (ResNet blocks,
``conv_norm_out``), the norm gathers the raw neighbour halo first and normalises the padded patch
in the same pass, folding the off-image mask into the affine step: the conv then skips its own
gather. Installed by ``PatchedModel``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from patchedserve.patch.context import PatchContext, get_forward_context
from patchedserve.patch.hooks import set_patched_forward
from patchedserve.patch.stitcher import gather_halo


def entry_group_stats(
    x: torch.Tensor, groups: int, eps: float, ctx: PatchContext
) -> tuple[torch.Tensor, torch.Tensor]:  # mean, rstd: [N, G] float32, per patch (its entry's values)
    """Per-entry GroupNorm statistics, broadcast back to every patch. ``x``: [N, C, ...]."""
    n = x.shape[0]
    var_p, mean_p = torch.var_mean(x.reshape(n, groups, -1).float(), dim=-1, unbiased=False)  # [N, G]
    counts = ctx.entry_num_patches  # [R, 1]
    r = ctx.num_entries
    mean_e = torch.zeros(r, groups, device=x.device).index_add_(0, ctx.patch_entry, mean_p) / counts
    spread = (mean_p - mean_e[ctx.patch_entry]).square() + var_p
    var_e = torch.zeros(r, groups, device=x.device).index_add_(0, ctx.patch_entry, spread) / counts
    rstd = torch.rsqrt(var_e + eps)
    return mean_e[ctx.patch_entry], rstd[ctx.patch_entry]


def _affine(
    norm: nn.GroupNorm, mean: torch.Tensor, rstd: torch.Tensor, channels: int
) -> tuple[torch.Tensor, torch.Tensor]:  # scale, shift: [N, C] float32 with y = x * scale + shift
    rep = channels // norm.num_groups
    scale = rstd.repeat_interleave(rep, dim=1)
    shift = -mean.repeat_interleave(rep, dim=1) * scale
    if norm.affine:
        scale = scale * norm.weight.float()
        shift = shift * norm.weight.float() + norm.bias.float()
    return scale, shift


def patch_group_norm(norm: nn.GroupNorm, emit_halo: int = 0) -> None:
    """Install per-image GroupNorm on ``norm``; ``emit_halo`` > 0 pads its output for the next conv."""

    def forward(original: Any, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, ...]
        ctx = get_forward_context()
        if ctx is None:
            return original(x)  # type: ignore[no-any-return]
        n, c = x.shape[:2]
        mean, rstd = entry_group_stats(x, norm.num_groups, norm.eps, ctx)
        scale, shift = _affine(norm, mean, rstd, c)
        if not emit_halo:
            view = (n, c) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(view).to(x.dtype), x, scale.view(view).to(x.dtype))
        index = ctx.halo_index(x.shape[-1], emit_halo)
        padded = gather_halo(x, index)  # [N, C, S, S], off-image pixels unmasked
        mask = index.mask.to(x.dtype)  # [N, 1, S, S]
        out = torch.addcmul(shift.view(n, c, 1, 1).to(x.dtype), padded, scale.view(n, c, 1, 1).to(x.dtype))
        return out.mul_(mask)  # [N, C, p + 2h, p + 2h]

    set_patched_forward(norm, forward)
