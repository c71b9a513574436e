"""The Patch Edge Stitcher: gives every patch a halo of its neighbours' border pixels.

A convolution with kernel > 1 needs, at a patch border, the pixels of the adjacent patches
(diagonals included) and zeros at the true image border. For a level where patches are ``side``
pixels wide, :func:`build_halo_index` precomputes, once per batch composition, for every pixel of
every padded patch ``[side + 2*halo]^2`` which patch and which pixel it reads. :func:`stitch` then
builds all padded patches with a single gather; off-image pixels read an arbitrary in-range pixel
and are zeroed by ``mask`` (the fused GroupNorm path folds that mask into its affine step instead).
Called by ``ops_conv`` and ``ops_norm`` through the forward context.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchedserve.layout import AttentionGroup, CSPLayout
from patchedserve.layout.csp import SENTINEL


@dataclass(frozen=True)
class HaloIndex:
    """Gather indices of one (side, halo) level of one composition."""

    side: int
    halo: int
    flat_src: torch.Tensor  # [N*S*S] long, source pixel (patch*side*side + row*side + col), S = side+2*halo
    flat_src_zero: torch.Tensor  # [N*S*S] long, like flat_src but off-image pixels read row N*side*side
    mask: torch.Tensor  # [N, 1, S, S] float32, 0 where the padded pixel lies outside the image

    @property
    def padded(self) -> int:
        return self.side + 2 * self.halo


def build_halo_index(layout: CSPLayout, side: int, halo: int, device: torch.device) -> HaloIndex:
    if not 0 <= halo <= side:
        raise ValueError(f"halo {halo} must be between 0 and the patch side {side}")
    s, h = side, halo
    big = s + 2 * h
    pos = np.arange(big) - h  # padded coordinate -> coordinate relative to the patch origin
    step = np.where(pos < 0, -1, np.where(pos >= s, 1, 0))  # which neighbour along this axis
    local = pos - step * s  # coordinate inside that neighbour
    dr, dc = np.meshgrid(step, step, indexing="ij")  # [S, S]
    lr, lc = np.meshgrid(local, local, indexing="ij")
    src = layout.neighbours[:, dr + 1, dc + 1]  # [N, S, S]
    inside = src != SENTINEL
    flat = np.where(inside, src, 0) * (s * s) + (lr * s + lc)[None]  # [N, S, S]
    zero_row = np.where(inside, flat, len(src) * s * s)
    return HaloIndex(
        side=s,
        halo=h,
        flat_src=torch.as_tensor(np.ascontiguousarray(flat).reshape(-1), device=device),
        flat_src_zero=torch.as_tensor(np.ascontiguousarray(zero_row).reshape(-1), device=device),
        mask=torch.as_tensor(inside.reshape(len(src), 1, big, big), dtype=torch.float32, device=device),
    )


@dataclass(frozen=True)
class GroupHaloIndex:
    """A :class:`HaloIndex` split by attention group, for producers that write each group's pixels
    into a tensor of its own (the per-image GroupNorm): a padded patch reads only pixels of its own
    image, hence of its own group."""

    padded: int
    blocks: tuple[tuple[int, int], ...]
    """Per group, its padded pixel rows ``[start, end)`` in the batch."""
    sources: tuple[torch.Tensor, ...]
    """Per group ``[N_g*S*S]`` long: the pixel row each padded pixel reads, counted from the
    group's first pixel (off-image pixels read row 0 and are zeroed afterwards)."""
    zero_rows: torch.Tensor
    """``[Z]`` long: padded pixel rows of the batch that lie outside their image."""


def build_group_halo_index(index: HaloIndex, groups: Sequence[AttentionGroup]) -> GroupHaloIndex:
    s2, area = index.padded * index.padded, index.side * index.side
    inside = index.mask.reshape(-1) > 0  # [N*S*S], the order of flat_src
    blocks, sources = [], []
    for g in groups:
        block = (g.patch_start * s2, g.patch_end * s2)
        src = index.flat_src[block[0] : block[1]] - g.patch_start * area
        sources.append(torch.where(inside[block[0] : block[1]], src, torch.zeros_like(src)))
        blocks.append(block)
    zero_rows = torch.nonzero(~inside).view(-1)
    return GroupHaloIndex(index.padded, tuple(blocks), tuple(sources), zero_rows)


def gather_groups(
    parts: Sequence[torch.Tensor], index: GroupHaloIndex, n: int
) -> torch.Tensor:  # [N, C, S, S] channels-last
    """Padded patches (zeros off-image) gathered from per-group pixel rows ``parts`` (each
    ``[N_g*side*side, C]``), every group straight into its block of one output, no staging copy."""
    c = parts[0].shape[1]
    out = parts[0].new_empty(n * index.padded * index.padded, c)  # [N*S*S, C]
    for rows, (start, end), src in zip(parts, index.blocks, index.sources, strict=True):
        torch.index_select(rows, 0, src, out=out[start:end])
    out.index_fill_(0, index.zero_rows, 0)
    return out.view(n, index.padded, index.padded, c).permute(0, 3, 1, 2)


def gather_halo(x: torch.Tensor, index: HaloIndex) -> torch.Tensor:  # [N, C, S, S] channels-last
    """Padded patches without zeroing: off-image pixels hold garbage that the caller must mask.

    ``x``: [N, C, side, side]. One ``index_select`` over the pixels of a channels-last view: each
    gathered row is a contiguous run of C values, which is far cheaper than a strided gather
    (measured on CPU: below the cost of ``F.pad`` for the same tensor). The result is
    channels-last, which convolutions on CPU and GPU consume natively.
    """
    n, c = x.shape[:2]
    pixels = x.permute(0, 2, 3, 1).reshape(-1, c)  # [N*side*side, C]; a view for channels-last x
    out = pixels.index_select(0, index.flat_src)  # [N*S*S, C]
    return out.view(n, index.padded, index.padded, c).permute(0, 3, 1, 2)


def pixel_buffer(n: int, c: int, side: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``[N*side*side + 1, C]`` buffer whose last row is zero, and a channels-last
    ``[N, C, side, side]`` view of the rest for a producer to write into (``out=``). Gathering from
    it with ``flat_src_zero`` yields zero halos at the image border without a masking pass."""
    buf = torch.empty(n * side * side + 1, c, device=like.device, dtype=like.dtype)
    buf[-1].zero_()
    return buf, buf[:-1].view(n, side, side, c).permute(0, 3, 1, 2)


def gather_from_buffer(buf: torch.Tensor, n: int, index: HaloIndex) -> torch.Tensor:  # [N, C, S, S]
    """Padded patches (zeros off-image) from a :func:`pixel_buffer`; channels-last."""
    out = buf.index_select(0, index.flat_src_zero)  # [N*S*S, C]
    return out.view(n, index.padded, index.padded, buf.shape[1]).permute(0, 3, 1, 2)


def stitch(x: torch.Tensor, index: HaloIndex) -> torch.Tensor:  # [N, C, S, S] channels-last
    """Padded patches with neighbour halos and zeros at the image border. ``x``: [N, C, side, side]."""
    return gather_halo(x, index).mul_(index.mask.to(x.dtype))


def refreshed_buffer(
    stored: torch.Tensor,  # [N, C, side, side] values of every patch as last computed
    rows: torch.Tensor,  # [A] long, patches computed now
    fresh: torch.Tensor,  # [A, C, side, side]
) -> tuple[torch.Tensor, torch.Tensor]:  # buffer [N*side*side + 1, C], its [N, C, side, side] view
    """A :func:`pixel_buffer` holding ``stored`` with ``rows`` replaced by ``fresh`` (patch cache)."""
    n, c, side = stored.shape[0], stored.shape[1], stored.shape[-1]
    buf, view = pixel_buffer(n, c, side, fresh)
    view.copy_(stored)
    view[rows] = fresh.to(view.dtype)
    return buf, view


def gather_rows_from_buffer(
    buf: torch.Tensor, index: HaloIndex, rows: torch.Tensor
) -> torch.Tensor:  # [A, C, S, S] channels-last
    """Padded patches of ``rows`` only (zeros off-image), from a :func:`pixel_buffer`."""
    s2 = index.padded * index.padded
    flat = index.flat_src_zero.view(-1, s2).index_select(0, rows).view(-1)  # [A*S*S]
    out = buf.index_select(0, flat)
    return out.view(len(rows), index.padded, index.padded, buf.shape[1]).permute(0, 3, 1, 2)
