"""The Compressed Sparse Patch (CSP) layout: index metadata for a dense batch of patches.

Every entry (one latent: a request, or one classifier-free-guidance branch of it) is cut into
equal square patches of ``patch_size`` latent pixels, in row-major order. All patches of all
entries form one dense tensor ``[num_patches, C, p, p]``. Entries are kept sorted by
``(patches per entry, height, width)`` so that

* each resolution group is a contiguous range of entries and of patches (``resolution_offsets``);
* entries with the same patch count are contiguous too, so per-image attention can view a group as
  ``[entries, patches * tokens, C]`` without copying (``attention_groups``).

The layout is pure host-side metadata (numpy). ``patchedserve.patch.context`` turns it into device
tensors once per composition. Built by the engine (or ``PatchedModel``) when the batch composition
changes; ``with_added``/``without`` update it in O(entries) instead of rebuilding from scratch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from patchedserve.errors import InvalidRequestError

SENTINEL = -1
"""Neighbour-table value for "outside the image": the stitcher reads zeros there."""


@dataclass(frozen=True)
class AttentionGroup:
    """A contiguous run of entries that all have ``patches_per_entry`` patches."""

    entry_start: int
    entry_end: int
    patch_start: int
    patch_end: int
    patches_per_entry: int

    @property
    def num_entries(self) -> int:
        return self.entry_end - self.entry_start


@dataclass(frozen=True)
class CSPLayout:
    """Index metadata of one batch composition. All arrays are numpy int64.

    ``sizes[i]`` is the latent ``(height, width)`` of the entry at layout position ``i``;
    ``entry_ids[i]`` is the caller's id for it (input order for ``PatchedModel``).
    """

    patch_size: int
    """Side of one patch in latent pixels."""
    sizes: tuple[tuple[int, int], ...]
    entry_ids: tuple[int, ...]
    entry_offsets: np.ndarray = field(repr=False)  # [R+1] first patch of each entry (RequestOffset)
    resolution_offsets: np.ndarray = field(repr=False)  # [G+1] entry index where each resolution starts
    patch_entry: np.ndarray = field(repr=False)  # [N] entry index of each patch
    patch_row: np.ndarray = field(repr=False)  # [N] row of the patch in its entry's patch grid
    patch_col: np.ndarray = field(repr=False)  # [N] column of the patch in its entry's patch grid
    grid: np.ndarray = field(repr=False)  # [R, 2] patch-grid shape (rows, cols) of each entry
    neighbours: np.ndarray = field(repr=False)  # [N, 3, 3] patch index at (dr+1, dc+1), SENTINEL off-image

    # ------------------------------------------------------------------ building
    @staticmethod
    def sort_key(size: tuple[int, int], patch_size: int) -> tuple[int, int, int]:
        h, w = size
        return ((h // patch_size) * (w // patch_size), h, w)

    @classmethod
    def build(
        cls, sizes: Sequence[tuple[int, int]], patch_size: int, entry_ids: Sequence[int] | None = None
    ) -> CSPLayout:
        """Lay out entries of the given latent sizes; ``entry_ids`` default to input positions."""
        if patch_size <= 0:
            raise InvalidRequestError(f"patch size must be positive, got {patch_size}", field="patch_size")
        ids = list(range(len(sizes))) if entry_ids is None else list(entry_ids)
        if len(ids) != len(sizes):
            raise ValueError("entry_ids and sizes differ in length")
        for h, w in sizes:
            check_size(h, w, patch_size)
        order = sorted(
            range(len(sizes)),
            key=lambda i: (cls.sort_key((int(sizes[i][0]), int(sizes[i][1])), patch_size), i),
        )
        return cls._from_sorted(
            tuple((int(sizes[i][0]), int(sizes[i][1])) for i in order),
            tuple(ids[i] for i in order),
            patch_size,
        )

    @classmethod
    def _from_sorted(
        cls, sizes: tuple[tuple[int, int], ...], entry_ids: tuple[int, ...], patch_size: int
    ) -> CSPLayout:
        p = patch_size
        grid = np.array([(h // p, w // p) for h, w in sizes], dtype=np.int64).reshape(-1, 2)
        counts = grid[:, 0] * grid[:, 1]
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        patch_entry = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
        local = np.arange(int(offsets[-1]), dtype=np.int64) - offsets[patch_entry]
        cols = grid[patch_entry, 1]
        patch_row, patch_col = local // cols, local % cols
        res_starts = [i for i in range(len(sizes)) if i == 0 or sizes[i] != sizes[i - 1]]
        resolution_offsets = np.array([*res_starts, len(sizes)], dtype=np.int64)
        neighbours = _neighbour_table(offsets, grid, patch_entry, patch_row, patch_col)
        return cls(
            p,
            sizes,
            entry_ids,
            offsets,
            resolution_offsets,
            patch_entry,
            patch_row,
            patch_col,
            grid,
            neighbours,
        )

    def subset(self, positions: Sequence[int]) -> CSPLayout:
        """The layout of the entries at these layout positions (ascending), in the same order: its
        patches are those entries' patch ranges of ``self``, concatenated."""
        return self._from_sorted(
            tuple(self.sizes[i] for i in positions),
            tuple(self.entry_ids[i] for i in positions),
            self.patch_size,
        )

    def with_added(self, sizes: Sequence[tuple[int, int]], entry_ids: Sequence[int]) -> CSPLayout:
        """A layout with more entries, each inserted at the end of its sort position."""
        new_sizes, new_ids = list(self.sizes), list(self.entry_ids)
        for size, eid in zip(sizes, entry_ids, strict=True):
            check_size(size[0], size[1], self.patch_size)
            key = self.sort_key((int(size[0]), int(size[1])), self.patch_size)
            pos = next(
                (i for i, s in enumerate(new_sizes) if self.sort_key(s, self.patch_size) > key),
                len(new_sizes),
            )
            new_sizes.insert(pos, (int(size[0]), int(size[1])))
            new_ids.insert(pos, eid)
        return self._from_sorted(tuple(new_sizes), tuple(new_ids), self.patch_size)

    def without(self, entry_ids: Sequence[int]) -> CSPLayout:
        """A layout with the given entries removed; the others keep their relative order."""
        drop = set(entry_ids)
        keep = [i for i, e in enumerate(self.entry_ids) if e not in drop]
        return self._from_sorted(
            tuple(self.sizes[i] for i in keep), tuple(self.entry_ids[i] for i in keep), self.patch_size
        )

    # ------------------------------------------------------------------ queries
    @property
    def num_entries(self) -> int:
        return len(self.sizes)

    @property
    def num_patches(self) -> int:
        return int(self.entry_offsets[-1])

    def patch_range(self, entry_id: int) -> tuple[int, int]:
        """Patch index range ``[start, end)`` of the entry with this caller id."""
        i = self.entry_ids.index(entry_id)
        return int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])

    def attention_groups(self) -> list[AttentionGroup]:
        """Contiguous runs of entries with equal patch counts (one attention call each)."""
        counts = np.diff(self.entry_offsets)
        groups: list[AttentionGroup] = []
        start = 0
        for i in range(1, self.num_entries + 1):
            if i == self.num_entries or counts[i] != counts[start]:
                groups.append(
                    AttentionGroup(
                        start,
                        i,
                        int(self.entry_offsets[start]),
                        int(self.entry_offsets[i]),
                        int(counts[start]),
                    )
                )
                start = i
        return groups

    def patch_index_map(self, old: CSPLayout) -> np.ndarray:
        """For each patch of ``self``, its index in ``old`` or SENTINEL when the entry is new.

        Lets the caller carry a dense per-patch tensor across a composition change with one gather.
        """
        out = np.full(self.num_patches, SENTINEL, dtype=np.int64)
        old_pos = {e: i for i, e in enumerate(old.entry_ids)}
        for i, eid in enumerate(self.entry_ids):
            j = old_pos.get(eid)
            if j is not None:
                a, b = int(self.entry_offsets[i]), int(self.entry_offsets[i + 1])
                out[a:b] = np.arange(int(old.entry_offsets[j]), int(old.entry_offsets[j + 1]))
        return out


def check_size(height: int, width: int, patch_size: int) -> None:
    """Refuse latent sizes that are not positive multiples of the patch size."""
    if height <= 0 or width <= 0 or height % patch_size or width % patch_size:
        raise InvalidRequestError(
            f"latent size {height}x{width} is not a positive multiple of the patch size {patch_size} "
            f"in both dimensions; allowed sizes are k*{patch_size} for k >= 1",
            field="size",
        )


def _neighbour_table(
    offsets: np.ndarray, grid: np.ndarray, patch_entry: np.ndarray, rows: np.ndarray, cols: np.ndarray
) -> np.ndarray:
    """[N, 3, 3]: index of the patch at offset (dr, dc), SENTINEL where that lies off the image."""
    n = len(patch_entry)
    table = np.full((n, 3, 3), SENTINEL, dtype=np.int64)
    gr, gc = grid[patch_entry, 0], grid[patch_entry, 1]
    for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
            r, c = rows + dr, cols + dc
            ok = (r >= 0) & (r < gr) & (c >= 0) & (c < gc)
            idx = offsets[patch_entry] + r * gc + c
            table[:, dr + 1, dc + 1] = np.where(ok, idx, SENTINEL)
    return table


def split_latents(
    latents: Sequence[torch.Tensor], layout: CSPLayout
) -> torch.Tensor:  # [num_patches, C, p, p]
    """Cut latents (in layout order, each ``[C, h, w]``) into the layout's dense patch tensor."""
    p = layout.patch_size
    chunks: list[torch.Tensor] = []
    bounds = layout.resolution_offsets
    for g in range(len(bounds) - 1):
        a, b = int(bounds[g]), int(bounds[g + 1])
        stack = torch.stack([latents[i] for i in range(a, b)])  # [R_g, C, h, w]
        r, c, h, w = stack.shape
        tiles = stack.view(r, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        chunks.append(tiles.reshape(r * (h // p) * (w // p), c, p, p))
    return torch.cat(chunks) if len(chunks) > 1 else chunks[0].contiguous()


def merge_patches(patches: torch.Tensor, layout: CSPLayout) -> list[torch.Tensor]:  # each [C, h, w]
    """Inverse of :func:`split_latents`: one ``[C, h, w]`` tensor per entry, in layout order."""
    p = layout.patch_size
    out: list[torch.Tensor] = []
    bounds = layout.resolution_offsets
    for g in range(len(bounds) - 1):
        a, b = int(bounds[g]), int(bounds[g + 1])
        h, w = layout.sizes[a]
        pa, pb = int(layout.entry_offsets[a]), int(layout.entry_offsets[b])
        c = patches.shape[1]
        tiles = patches[pa:pb].view(b - a, h // p, w // p, c, p, p).permute(0, 3, 1, 4, 2, 5)
        out.extend(tiles.reshape(b - a, c, h, w).unbind(0))
    return out
