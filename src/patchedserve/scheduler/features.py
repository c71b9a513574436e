"""What the latency predictor sees of a batch: a mix of requests -> one feature vector.

A denoising step's cost is set by what it computes, so the features are its cost terms rather
than a vocabulary of resolutions (as in the paper's "tasks per resolution"), which could not
price a resolution the profile never saw:

* ``total_patches``: every pixel-wise operator (convolutions, linear layers, feed-forward,
  cross-attention, halo stitching) costs the same per patch, whatever image it belongs to;
* ``attention``: per-image self-attention costs ``tokens²``, so an entry of ``n`` patches costs
  ``n²`` patch-units; this is where a 1024² image differs from sixteen 256² ones;
* ``entries``, ``requests``, ``cfg_requests``: per-latent and per-request overheads (conditioning,
  timestep embedding, the second branch of classifier-free guidance);
* ``resolutions``, ``patch_groups``: per-group launches (attention runs batched per patch count,
  the CSP layout groups by resolution).

Each of these is a sum over the entries of a function of the entry's patch count, so the
"patches per resolution" and "requests per resolution" of the mix (kept in ``MixSums`` as
counters) determine them, and any resolution, profiled or not, maps onto them. CFG share
enters as the count of CFG requests (share x requests), which keeps every feature additive.

``MixSums`` is additive: adding a candidate to an active set is O(1), which is what keeps an SLO
decision over 100 waiting requests well under a millisecond. Used by ``predictor`` and
``profile``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

Entry = tuple[int, int, bool]
"""One request as the predictor sees it: (width px, height px, classifier-free guidance on)."""

FEATURE_NAMES: tuple[str, ...] = (
    "bias",
    "total_patches",
    "attention",
    "entries",
    "requests",
    "cfg_requests",
    "resolutions",
    "patch_groups",
)
"""Names of the feature vector's components, in order (stored with every profile)."""


def patches_of(width: int, height: int, patch_size: int) -> int:
    """Patches of one branch of a ``width`` x ``height`` image (a partial patch counts as whole)."""
    return -(-width // patch_size) * -(-height // patch_size)


@dataclass
class MixSums:
    """Additive summary of a mix of requests; the feature vector is a function of it."""

    patch_size: int
    """Patch side in image pixels."""
    total_patches: int = 0
    """Patches over all entries (a CFG request counts its patches twice)."""
    attention: int = 0
    """Sum over entries of (patches of the entry)²: the self-attention cost in patch units."""
    entries: int = 0
    """Latents in the batch (a CFG request contributes 2)."""
    requests: int = 0
    """Requests in the batch."""
    cfg_requests: int = 0
    """Requests that run classifier-free guidance."""
    requests_per_resolution: Counter[tuple[int, int]] = field(default_factory=Counter)
    """(width, height) -> requests of that size."""
    patches_per_resolution: Counter[tuple[int, int]] = field(default_factory=Counter)
    """(width, height) -> patches (all entries) of that size."""
    entries_per_patch_count: Counter[int] = field(default_factory=Counter)
    """Patches per entry -> entries with that many (the attention groups)."""

    @classmethod
    def of(cls, entries: Iterable[Entry], patch_size: int) -> MixSums:
        sums = cls(patch_size)
        for entry in entries:
            sums.add(entry)
        return sums

    def add(self, entry: Entry, sign: int = 1) -> None:
        """Adds one request (``sign=-1`` removes it)."""
        width, height, cfg = entry
        n = patches_of(width, height, self.patch_size)
        branches = 2 if cfg else 1
        self.total_patches += sign * n * branches
        self.attention += sign * n * n * branches
        self.entries += sign * branches
        self.requests += sign
        self.cfg_requests += sign * int(cfg)
        self.requests_per_resolution[(width, height)] += sign
        self.patches_per_resolution[(width, height)] += sign * n * branches
        self.entries_per_patch_count[n] += sign * branches
        if sign < 0:
            for counter in (self.requests_per_resolution, self.patches_per_resolution):
                if counter[(width, height)] <= 0:
                    del counter[(width, height)]
            if self.entries_per_patch_count[n] <= 0:
                del self.entries_per_patch_count[n]

    def remove(self, entry: Entry) -> None:
        self.add(entry, sign=-1)

    def vector(self) -> tuple[float, ...]:
        """The feature vector (see ``FEATURE_NAMES``); all zeros but the bias for an empty mix."""
        return (
            1.0,
            float(self.total_patches),
            float(self.attention),
            float(self.entries),
            float(self.requests),
            float(self.cfg_requests),
            float(len(self.requests_per_resolution)),
            float(len(self.entries_per_patch_count)),
        )

    def vector_with(self, entry: Entry) -> tuple[float, ...]:
        """The feature vector of this mix plus ``entry``, without changing the mix (O(1))."""
        width, height, cfg = entry
        n = patches_of(width, height, self.patch_size)
        branches = 2 if cfg else 1
        new_resolution = (width, height) not in self.requests_per_resolution
        new_group = n not in self.entries_per_patch_count
        return (
            1.0,
            float(self.total_patches + n * branches),
            float(self.attention + n * n * branches),
            float(self.entries + branches),
            float(self.requests + 1),
            float(self.cfg_requests + int(cfg)),
            float(len(self.requests_per_resolution) + new_resolution),
            float(len(self.entries_per_patch_count) + new_group),
        )


def feature_vector(entries: Sequence[Entry], patch_size: int) -> tuple[float, ...]:
    """Features of a mix given as a list of requests."""
    return MixSums.of(entries, patch_size).vector()
