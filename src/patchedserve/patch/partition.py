"""How a patched step's entries are shared out over CPU streams (``PatchedModel.streams`` > 1).

The streams run side by side, so a step takes as long as its slowest part. What a part costs is
not just its patch count:

* a part that holds a single resolution runs the model's own forward
  (``PatchedModel.plain_single_resolution``) and skips the patched path's fixed cost (halo
  indices, per-image GroupNorm and attention bookkeeping);
* an entry's attention grows with the square of its patch count.

So equal patch counts are not always the fastest split. Two 512x512 and two 512x256 entries (one
request of each size with CFG) run faster as two mixed parts of one of each than as a 512x512
part beside a 512x256 part, which has a third of the work on one thread.

For two streams, ``stream_parts`` prices with ``PartCost`` every split that puts the first k
entries of each resolution group in the first part, and keeps the one whose slower part is
cheapest (memoised per composition). Any contiguous cut of the layout is one of those splits.
Other stream counts take contiguous cuts of about equal patch counts (``balanced_cuts``).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patchedserve.layout import CSPLayout
from patchedserve.streams import balanced_cuts

Groups = tuple[tuple[int, int], ...]
"""A composition: (entries, patches per entry) of each resolution group, in layout order."""


@dataclass(frozen=True)
class PartCost:
    """Time of one part on one thread, in units of one patch of work.

    Measured on this 2-core CPU (tiny-sdxl, patch 256): one-thread ``forward_batch`` calls over 70
    mixes of 1-12 entries of 256x256, 512x256 and 512x512, each while another thread runs a mixed
    batch beside it as the other stream does, fitted by least squares (2.1% mean error;
    ``scripts/stream_split_probe.py --fit``): 25.6 ms fixed, 10.9 ms per patch, 0.59 ms per squared
    patch count of an entry, 18.2 ms less for a part of one resolution. The fit put almost nothing
    on each resolution beyond the first, but side by side, splits that gave both parts all three
    resolutions ran up to 11% slower than the contiguous cut they were predicted to beat;
    ``extra_resolution`` is set to one patch after comparing 0 (fitted), 0.5 and 1 with the
    probe's default mode. Other models and machines get the same figures (streams run on CPUs only).
    """

    fixed_mixed: float = 2.35
    """A part of several resolutions: the patched path's fixed cost."""
    fixed_single: float = 0.68
    """A part of one resolution: the model's own forward."""
    attention: float = 0.054
    """Per squared patch count of each entry."""
    extra_resolution: float = 1.0
    """Per resolution beyond the first."""

    def __call__(self, groups: Groups, taken: Sequence[int]) -> float:
        """Cost of a part holding ``taken[g]`` entries of each group ``g``."""
        present = [(k, p) for k, (_, p) in zip(taken, groups, strict=True) if k > 0]
        if not present:
            return 0.0
        fixed = self.fixed_single if len(present) == 1 else self.fixed_mixed
        work = sum(k * (p + self.attention * p * p) for k, p in present)
        return fixed + work + self.extra_resolution * (len(present) - 1)


PART_COST = PartCost()


@functools.lru_cache(maxsize=4096)
def best_split(groups: Groups, cost: PartCost = PART_COST) -> tuple[int, ...]:
    """How many entries of each group the first of two parts takes, for the cheapest slower part
    (ties: the first found, which takes fewer entries first). Both parts non-empty."""
    total = sum(n for n, _ in groups)
    best: tuple[float, tuple[int, ...]] | None = None
    for taken in itertools.product(*(range(n + 1) for n, _ in groups)):
        if not 0 < sum(taken) < total:
            continue
        rest = [n - k for (n, _), k in zip(groups, taken, strict=True)]
        slower = max(cost(groups, taken), cost(groups, rest))
        if best is None or slower < best[0] - 1e-12:
            best = (slower, taken)
    assert best is not None  # total >= 2 leaves at least one split
    return best[1]


def stream_parts(layout: CSPLayout, streams: int) -> list[list[int]]:
    """Entry positions (ascending) of each part of a step over ``streams`` streams."""
    n = layout.num_entries
    if streams <= 1 or n <= 1:
        return [list(range(n))]
    if streams != 2:
        counts = np.diff(layout.entry_offsets).tolist()
        return [list(range(a, b)) for a, b in balanced_cuts(counts, streams)]
    bounds = layout.resolution_offsets
    offsets = layout.entry_offsets
    groups = tuple((int(b - a), int(offsets[a + 1] - offsets[a])) for a, b in itertools.pairwise(bounds))
    taken = best_split(groups)
    first: list[int] = []
    second: list[int] = []
    for (a, b), k in zip(itertools.pairwise(bounds), taken, strict=True):
        first.extend(range(int(a), int(a) + k))
        second.extend(range(int(a) + k, int(b)))
    return [first, second]
