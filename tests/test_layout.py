"""CSP layout and Patch Edge Stitcher: exact inverses and exact halos, on random mixes."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from patchedserve.errors import InvalidRequestError
from patchedserve.layout import CSPLayout, merge_patches, split_latents
from patchedserve.layout.csp import SENTINEL
from patchedserve.patch.stitcher import build_group_halo_index, build_halo_index, gather_groups, stitch

CPU = torch.device("cpu")


@st.composite
def mixes(draw: st.DrawFn) -> tuple[int, list[tuple[int, int]]]:
    p = draw(st.sampled_from([1, 2, 3, 4]))
    sizes = draw(st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=6))
    return p, [(h * p, w * p) for h, w in sizes]


@settings(max_examples=40, deadline=None)
@given(mixes())
def test_split_merge_are_exact_inverses(mix: tuple[int, list[tuple[int, int]]]) -> None:
    p, sizes = mix
    layout = CSPLayout.build(sizes, p)
    latents = [torch.randn(3, h, w) for h, w in layout.sizes]
    patches = split_latents(latents, layout)
    assert patches.shape == (layout.num_patches, 3, p, p)
    for a, b in zip(latents, merge_patches(patches, layout), strict=True):
        assert torch.equal(a, b)


@settings(max_examples=40, deadline=None)
@given(mixes(), st.integers(0, 4))
def test_stitched_patch_equals_crop_of_zero_padded_image(
    mix: tuple[int, list[tuple[int, int]]], halo: int
) -> None:
    p, sizes = mix
    halo = min(halo, p)
    layout = CSPLayout.build(sizes, p)
    latents = [torch.randn(2, h, w) for h, w in layout.sizes]
    padded = stitch(split_latents(latents, layout), build_halo_index(layout, p, halo, CPU))
    for k in range(layout.num_patches):
        e = int(layout.patch_entry[k])
        full = F.pad(latents[e], (halo,) * 4)
        r, c = int(layout.patch_row[k]) * p, int(layout.patch_col[k]) * p
        assert torch.equal(padded[k], full[:, r : r + p + 2 * halo, c : c + p + 2 * halo])


@settings(max_examples=40, deadline=None)
@given(mixes(), st.integers(0, 4))
def test_gathering_per_group_equals_the_one_batch_stitch(
    mix: tuple[int, list[tuple[int, int]]], halo: int
) -> None:
    """Each attention group's pixels in a tensor of its own (as the per-image GroupNorm makes them)
    give the same padded patches as stitching the whole batch: neighbour halos and zero borders."""
    p, sizes = mix
    halo = min(halo, p)
    layout = CSPLayout.build(sizes, p)
    x = torch.randn(layout.num_patches, 5, p, p).contiguous(memory_format=torch.channels_last)
    index = build_halo_index(layout, p, halo, CPU)
    rows = x.permute(0, 2, 3, 1).reshape(-1, 5)  # [N*p*p, C]
    parts = [rows[g.patch_start * p * p : g.patch_end * p * p].clone() for g in layout.attention_groups()]
    got = gather_groups(parts, build_group_halo_index(index, layout.attention_groups()), layout.num_patches)
    assert torch.equal(got, stitch(x, index))


def test_layout_orders_by_resolution_with_offsets() -> None:
    # The paper's example: 512, 512, 768, 1024 px with 256 px patches -> 4, 4, 9, 16 patches.
    layout = CSPLayout.build([(128, 128), (64, 64), (96, 96), (64, 64)], 32)
    assert layout.sizes == ((64, 64), (64, 64), (96, 96), (128, 128))
    assert layout.entry_ids == (1, 3, 2, 0)
    assert layout.entry_offsets.tolist() == [0, 4, 8, 17, 33]
    assert layout.resolution_offsets.tolist() == [0, 2, 3, 4]
    groups = layout.attention_groups()
    assert [(g.patch_start, g.patch_end, g.patches_per_entry) for g in groups] == [
        (0, 8, 4),
        (8, 17, 9),
        (17, 33, 16),
    ]


def test_neighbour_table_includes_diagonals_and_sentinels() -> None:
    layout = CSPLayout.build([(3, 3)], 1)  # a 3x3 grid of 1-pixel patches, indices 0..8
    assert layout.neighbours[4].tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    corner = layout.neighbours[0]
    assert corner[0].tolist() == [SENTINEL] * 3 and corner[:, 0].tolist() == [SENTINEL] * 3
    assert corner[2, 2] == 4


@settings(max_examples=30, deadline=None)
@given(mixes(), st.data())
def test_incremental_updates_match_a_fresh_build(
    mix: tuple[int, list[tuple[int, int]]], data: st.DataObject
) -> None:
    p, sizes = mix
    layout = CSPLayout.build(sizes, p)
    extra = data.draw(st.lists(st.tuples(st.integers(1, 3), st.integers(1, 3)), max_size=3))
    extra_px = [(h * p, w * p) for h, w in extra]
    new_ids = list(range(100, 100 + len(extra_px)))
    grown = layout.with_added(extra_px, new_ids)
    fresh = CSPLayout.build(list(sizes) + extra_px, p, list(range(len(sizes))) + new_ids)
    assert grown.sizes == fresh.sizes
    assert np.array_equal(grown.neighbours, fresh.neighbours)
    drop = data.draw(
        st.lists(st.sampled_from(grown.entry_ids), unique=True, max_size=len(grown.entry_ids) - 1)
    )
    shrunk = grown.without(drop)
    kept = [(s, e) for s, e in zip(grown.sizes, grown.entry_ids, strict=True) if e not in drop]
    assert shrunk.sizes == tuple(s for s, _ in kept)
    # Carrying per-patch data across the change is one gather.
    src = torch.arange(grown.num_patches)
    index = shrunk.patch_index_map(grown)
    assert (index >= 0).all()
    for e in shrunk.entry_ids:
        a, b = shrunk.patch_range(e)
        c, d = grown.patch_range(e)
        assert torch.equal(src[index[a:b]], src[c:d])


def test_sizes_that_are_not_multiples_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="multiple of the patch size 4"):
        CSPLayout.build([(8, 6)], 4)
    with pytest.raises(InvalidRequestError):
        CSPLayout.build([(0, 8)], 4)
