"""Patch-aware Conv2d: convolve each patch padded with its neighbours' borders (exact).

For a conv with kernel k, stride s and zero padding ``pad``, full-image output pixel ``i`` reads
input rows ``s*i - pad .. s*i - pad + k - 1``. With patches aligned to the stride, a patch needs a
halo of ``pad`` pixels before it and ``k - s - pad`` after it; we gather ``pad`` on every side
(the surplus row/column after the patch is simply not read when ``k - s - pad < pad``) and convolve
without padding. Kernel-1 convs are pixel-wise and keep their original forward.

A conv whose input was already padded by a fused GroupNorm (``ops_norm``) is marked
``prepadded`` and skips the gather. Installed by ``PatchedModel``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from patchedserve.patch.context import get_forward_context, timed
from patchedserve.patch.hooks import set_patched_forward
from patchedserve.patch.stitcher import gather_rows_from_buffer, refreshed_buffer, stitch


def conv_halo(conv: nn.Conv2d) -> int:
    """Halo (pixels per side) the conv needs on patches; 0 for pixel-local convs."""
    k, s = conv.kernel_size, conv.stride
    pad = conv.padding
    if isinstance(pad, str):
        raise ValueError(f"string padding {pad!r} is not supported by patched execution")
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        raise ValueError("patched Conv2d supports zero padding and dilation 1 only")
    if k[0] != k[1] or s[0] != s[1] or pad[0] != pad[1]:
        raise ValueError(f"patched Conv2d needs square kernels, strides and padding, got {k}, {s}, {pad}")
    if k[0] - s[0] - pad[0] > pad[0]:
        raise ValueError(f"Conv2d(kernel={k[0]}, stride={s[0]}, padding={pad[0]}) reads past its halo")
    return int(pad[0])


def patch_conv2d(conv: nn.Conv2d, prepadded: bool = False) -> None:
    """Install the patch-aware forward on ``conv`` (a no-op for halo-free convs)."""
    halo = conv_halo(conv)
    if halo == 0:
        return
    stride = conv.stride[0]
    weights: dict[str, Any] = {}

    def channels_last_weight() -> torch.Tensor:  # [C_out, C_in/groups, k, k] channels-last
        """The weight in the patches' memory format, converted once (again if it is replaced or
        changed in place), instead of by every call."""
        w = conv.weight
        if torch.is_grad_enabled():  # a cached copy would drop out of the autograd graph
            return w.contiguous(memory_format=torch.channels_last)
        key = (w.data_ptr(), w._version, w.dtype, w.device)
        if weights.get("key") != key:
            weights["key"], weights["value"] = key, w.contiguous(memory_format=torch.channels_last)
        return weights["value"]

    def forward(original: Any, x: torch.Tensor) -> torch.Tensor:  # x: [N, C, p, p] (or padded)
        ctx = get_forward_context()
        if ctx is None:
            return original(x)
        if prepadded:
            side = x.shape[-1] - 2 * halo
            padded = x
        elif ctx.subset is not None and ctx.cache is not None:  # patch cache: halos of reused patches
            side, rows = x.shape[-1], ctx.subset.index
            buf, full = refreshed_buffer(ctx.cache.site((id(conv), "in")), rows, x)
            ctx.cache.record((id(conv), "in"), full)
            with timed(ctx, "stitch"):
                padded = gather_rows_from_buffer(buf, ctx.halo_index(side, halo), rows)
        else:
            side = x.shape[-1]
            ctx.recording((id(conv), "in"), x)
            with timed(ctx, "stitch"):
                padded = stitch(x, ctx.halo_index(side, halo))
        out = F.conv2d(padded, channels_last_weight(), conv.bias, stride, 0, 1, conv.groups)
        keep = side // stride
        if out.shape[-1] != keep:  # the unread surplus halo row/column of strided convs
            out = out[..., :keep, :keep]
        return out  # [N, C_out, p/stride, p/stride]

    set_patched_forward(conv, forward)
