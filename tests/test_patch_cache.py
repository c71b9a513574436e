"""The patch-level block cache: its partial block calls are exact given exact stand-ins, it carries
across composition changes, and it reuses where inputs repeat.

The cache is approximate by design (reused patches take an earlier step's block output). What must
hold exactly is the machinery: when the stand-ins a partial call reads (other patches' GroupNorm
statistics, halos, keys and values) are the values the full call would compute, the partial call
equals the full forward. We get that by repeating an identical call while the reuse decision is
replaced by a random mask, so every partial path (GroupNorm, fused halo, conv halo, self-, cross-
and SD3 joint attention, the context stream) runs with arbitrary active sets.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import pytest
import torch

from patchedserve.errors import InvalidRequestError
from patchedserve.layout import merge_patches, split_latents
from patchedserve.models import load_model
from patchedserve.patch import PatchBatch, PatchCacheConfig, PatchedModel
from patchedserve.patch.cache import PatchCache
from test_patch_exact import FAMILIES, REL_TOL, Req, make_request, patched, rel_err, run_full, run_patched

GRANULARITIES = ["patch", "image"]


@cache
def cached_model(name: str, granularity: str) -> PatchedModel:
    denoiser = load_model(name).denoiser
    config = PatchCacheConfig(threshold=1.0, granularity=granularity)
    return PatchedModel(denoiser, patch_size=PatchedModel.min_patch_size(denoiser), cache=config)


def fresh_cache(
    pm: PatchedModel, seed: int, share: float = 0.5, decisions: list[torch.Tensor] | None = None
) -> PatchCache:
    """Reset ``pm``'s cache and make it reuse a random ``share`` of the valid patches (or, at image
    granularity, of the valid images) per block; each decision ([N] bool) goes to ``decisions``."""
    assert pm.cache is not None
    pm.cache = PatchCache(pm.cache.config)
    g = torch.Generator().manual_seed(seed)
    per_image = pm.cache.config.granularity == "image"

    def decide(state: object, watched: object, ctx: object) -> torch.Tensor:
        valid = state.valid  # type: ignore[attr-defined]
        if per_image:
            entry = ctx.patch_entry  # type: ignore[attr-defined]
            reuse = valid & (torch.rand(int(entry.max()) + 1, generator=g) < share)[entry]
        else:
            reuse = valid & (torch.rand(valid.shape, generator=g) < share)
        if decisions is not None:
            decisions.append(reuse)
        return reuse

    pm.cache._decide = decide  # type: ignore[method-assign]
    return pm.cache


def batch_of(pm: PatchedModel, reqs: list[Req], ids: list[int]) -> PatchBatch:
    """A ``PatchBatch`` with stable entry ids (as the engine builds them)."""
    layout = pm.layout_for(
        [(r.latent.shape[-2] * pm.vae_scale_factor, r.latent.shape[-1] * pm.vae_scale_factor) for r in reqs],
        ids,
    )
    by_id = dict(zip(ids, reqs, strict=True))
    order = [by_id[i] for i in layout.entry_ids]
    return PatchBatch(
        layout,
        split_latents([r.latent for r in order], layout),
        torch.stack([r.timestep for r in order]),
        torch.stack([r.text for r in order]),
        None if order[0].pooled is None else torch.stack([r.pooled for r in order]),  # type: ignore[misc]
        None if order[0].time_ids is None else torch.stack([r.time_ids for r in order]),  # type: ignore[misc]
    )


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_partial_block_calls_are_exact_with_exact_stand_ins(
    name: str, granularity: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    pm = cached_model(name, granularity)
    reqs = [make_request(pm, g, 10 + i) for i, g in enumerate([(1, 1), (2, 1), (2, 2), (3, 2), (1, 3)])]
    refs = [run_full(pm, r) for r in reqs]
    decisions: list[torch.Tensor] = []
    cache_state = fresh_cache(pm, seed=1, decisions=decisions)
    computed = count_partial_rows(monkeypatch)
    for _ in range(3):  # the first call computes everything; later ones run partial blocks
        for out, ref in zip(run_patched(pm, reqs), refs, strict=True):
            assert rel_err(out, ref) <= REL_TOL
    assert 0.15 < cache_state.stats.reuse_fraction < 0.65  # partial calls really happened
    # Identical inputs cannot tell a reused patch from a recomputed one: count what ran instead.
    # A partial call computes exactly the patches its decision did not reuse.
    # (A block whose every patch reuses may skip the call: calls that compute nothing are left out.)
    partial = [int((~d).sum()) for d in decisions if d.any()]
    assert [n for n in computed if n] == [n for n in partial if n] and len(partial) >= 4


def count_partial_rows(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patches each partial block call computes, in call order (from now on)."""
    rows: list[int] = []
    call, run_images = PatchCache._call, PatchCache._run_images

    def counted_call(ctx: Any, active: Any, original: Any, bound: Any) -> Any:
        if not active.full:
            rows.append(int(active.index.numel()))
        return call(ctx, active, original, bound)

    def counted_images(self: PatchCache, state: Any, spec: Any, original: Any, bound: Any, ctx: Any,
                       reuse: torch.Tensor, index: torch.Tensor) -> Any:  # fmt: skip
        rows.append(int(index.numel()))
        return run_images(self, state, spec, original, bound, ctx, reuse, index)

    monkeypatch.setattr(PatchCache, "_call", staticmethod(counted_call))
    monkeypatch.setattr(PatchCache, "_run_images", counted_images)
    return rows


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", FAMILIES)
def test_cache_follows_the_batch_when_requests_join_and_leave(name: str, granularity: str) -> None:
    pm = cached_model(name, granularity)
    reqs = [make_request(pm, g, 30 + i) for i, g in enumerate([(1, 1), (2, 1), (2, 2), (1, 2)])]
    fresh_cache(pm, seed=2)
    pm.forward_batch(batch_of(pm, reqs[:3], [0, 1, 2]))
    pm.forward_batch(batch_of(pm, reqs[:3], [0, 1, 2]))  # partial calls, in the first layout
    # request 0 leaves, 3 joins (new rows must compute everything), 1 and 2 move in the layout
    batch = batch_of(pm, reqs[1:], [1, 2, 3])
    before = pm.cache.stats.reused
    out = pm.forward_batch(batch)
    assert pm.cache.stats.reused > before  # the stayers' cache carried over into the new layout
    merged = merge_patches(out, batch.layout)
    for eid, got in zip(batch.layout.entry_ids, merged, strict=True):
        assert rel_err(got, run_full(pm, reqs[eid])) <= REL_TOL


@pytest.mark.parametrize("name", FAMILIES)
def test_threshold_zero_never_reuses_and_stays_exact(name: str) -> None:
    denoiser = load_model(name).denoiser
    pm = PatchedModel(denoiser, PatchedModel.min_patch_size(denoiser), cache=PatchCacheConfig(threshold=0.0))
    exact = patched(name, 1)
    reqs = [make_request(pm, g, 50 + i) for i, g in enumerate([(1, 2), (2, 2)])]
    for _ in range(2):
        for a, b in zip(run_patched(pm, reqs), run_patched(exact, reqs), strict=True):
            assert rel_err(a, b) <= REL_TOL
    assert pm.cache is not None and pm.cache.stats.reused == 0


def test_repeated_inputs_reuse_and_changed_inputs_recompute() -> None:
    denoiser = load_model("tiny-sdxl").denoiser
    pm = PatchedModel(denoiser, 64, cache=PatchCacheConfig(threshold=1e-3, max_reuse=1))
    exact = patched("tiny-sdxl", 1)
    r = make_request(pm, (2, 2), seed=5)
    run_patched(pm, [r])
    assert pm.cache is not None
    before = pm.cache.stats.reused
    run_patched(pm, [r])  # identical input: every patch reuses every block
    blocks = len(pm.cache.blocks)
    assert pm.cache.stats.reused - before == 4 * blocks
    again = run_patched(pm, [r])[0]  # max_reuse=1: must recompute now
    assert rel_err(again, run_patched(exact, [r])[0]) <= REL_TOL
    r.latent = r.latent + torch.randn_like(r.latent)  # a large change: nothing may reuse
    before = pm.cache.stats.reused
    changed = run_patched(pm, [r])[0]
    assert pm.cache.stats.reused == before
    assert rel_err(changed, run_patched(exact, [r])[0]) <= REL_TOL


def test_bad_cache_settings_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="threshold"):
        PatchCacheConfig(threshold=-1.0)
    with pytest.raises(InvalidRequestError, match="max_reuse"):
        PatchCacheConfig(max_reuse=0)
    with pytest.raises(InvalidRequestError, match="granularity"):
        PatchCacheConfig(granularity="pixel")
    denoiser = load_model("tiny-sdxl").denoiser
    with pytest.raises(InvalidRequestError, match="max_patches_per_call"):
        PatchedModel(denoiser, 64, max_patches_per_call=4, cache=PatchCacheConfig())


@pytest.mark.parametrize("granularity", GRANULARITIES)
@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3"])
def test_a_joiner_becomes_reusable_and_full_reuse_keeps_the_output(name: str, granularity: str) -> None:
    denoiser = load_model(name).denoiser
    config = PatchCacheConfig(threshold=1e-3, max_reuse=9, granularity=granularity)
    pm = PatchedModel(denoiser, PatchedModel.min_patch_size(denoiser), cache=config)
    assert pm.cache is not None
    reqs = [make_request(pm, g, 70 + i) for i, g in enumerate([(1, 2), (2, 2), (1, 1)])]
    pm.forward_batch(batch_of(pm, reqs[:2], [0, 1]))
    pm.forward_batch(batch_of(pm, reqs, [0, 1, 2]))  # request 2 joins and computes every block
    blocks, patches = len(pm.cache.blocks), 2 + 4 + 1
    before = pm.cache.stats.reused
    batch = batch_of(pm, reqs, [0, 1, 2])
    out = merge_patches(pm.forward_batch(batch), batch.layout)  # identical inputs: all reuse
    assert pm.cache.stats.reused - before == blocks * patches  # the joiner's patches included
    for eid, got in zip(batch.layout.entry_ids, out, strict=True):  # SD3: the context stream still ran
        assert rel_err(got, run_full(pm, reqs[eid])) <= REL_TOL


def test_served_cache_factor_runs_staggered_trajectories() -> None:
    from patchedserve.cluster.calibrate import Calibration, measure_patch_cache_factor
    from patchedserve.engine.prepare import Preparer

    bundle = load_model("tiny-sdxl")
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    config = Calibration(sizes=((64, 64), (128, 64)), batch_sizes=(3,), patch_size=64, steps=3, cache_mixes=1)
    _, reuse = measure_patch_cache_factor(bundle, preparer, config, PatchCacheConfig(threshold=0.0))
    assert reuse == 0.0
    _, reuse = measure_patch_cache_factor(
        bundle, preparer, config, PatchCacheConfig(threshold=1e9, max_reuse=9)
    )
    # joiners compute their first step; every other patch-block reuses (staggered: 3 joins)
    assert 0.3 < reuse < 1.0


@pytest.mark.parametrize("streams", [1, 2])
def test_a_served_cache_reports_reuse_and_frees_its_memory_when_idle(streams: int) -> None:
    from patchedserve.engine import Engine
    from patchedserve.request import GenerationRequest
    from patchedserve.server.metrics import ServerMetrics

    engine = Engine.from_model(
        "tiny-sdxl",
        patch_size=64,
        decode_in_thread=False,
        patch_cache=PatchCacheConfig(threshold=1e9),
        streams=streams,
    )
    metrics = ServerMetrics(engine)
    engine.generate([GenerationRequest("a red fox", width=128, height=64, steps=4, seed=1)])
    text = metrics.render().decode()
    [sample] = [
        line for line in text.splitlines() if line.startswith("patchedserve_patch_cache_reuse_ratio ")
    ]
    assert float(sample.split()[1]) == pytest.approx(0.5)  # 4 steps, max_reuse 2: compute, reuse x2, compute
    caches = engine.model.caches
    assert len(caches) == streams and all(c.blocks for c in caches)  # CFG branches: one per stream
    engine.step()  # an idle iteration
    assert not any(c.blocks for c in caches) and engine.model.cache_nbytes() == 0
    uncached = Engine.from_model("tiny-sdxl", decode_in_thread=False)
    assert "patchedserve_patch_cache" not in ServerMetrics(uncached).render().decode()


def test_per_step_cache_profile_follows_the_trajectorys_reuse() -> None:
    """Step 0 computes every block; with reuse always allowed the later steps skip them all."""
    from patchedserve.cluster.calibrate import Calibration, measure_patch_cache_steps
    from patchedserve.engine.prepare import Preparer

    bundle = load_model("tiny-sdxl")
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    config = Calibration(sizes=((128, 128),), patch_size=64, steps=3, repeats=6)
    never = measure_patch_cache_steps(bundle, preparer, config, PatchCacheConfig(threshold=0.0))
    always = measure_patch_cache_steps(bundle, preparer, config, PatchCacheConfig(threshold=1e9, max_reuse=9))
    assert len(never) == len(always) == 3
    assert min(never) > 0.6  # the cache only adds its comparisons
    assert always[0] > 0.6 and max(always[1:]) < 0.5 * always[0]


@pytest.mark.parametrize("name", ["tiny-sdxl", "tiny-sd3"])
def test_streams_keep_each_entry_with_its_own_streams_cache(name: str) -> None:
    denoiser = load_model(name).denoiser
    config = PatchCacheConfig(threshold=1e-3, max_reuse=9)
    pm = PatchedModel(denoiser, PatchedModel.min_patch_size(denoiser), cache=config, streams=2)
    reqs = [make_request(pm, g, 90 + i) for i, g in enumerate([(1, 2), (2, 2), (1, 1), (2, 1)])]
    pm.forward_batch(batch_of(pm, reqs[:3], [0, 1, 2]))  # every block computes
    for part_cache, ids in zip(pm.caches, ([0], [1, 2]), strict=True):  # (id // 2 + id % 2) % 2
        assert part_cache.layout is not None and sorted(part_cache.layout.entry_ids) == ids
    batch = batch_of(pm, reqs[:3], [0, 1, 2])
    before = pm.cache_stats().reused
    out = merge_patches(pm.forward_batch(batch), batch.layout)  # identical inputs: everything reuses
    blocks = len(pm.caches[0].blocks)
    assert pm.cache_stats().reused - before == blocks * (2 + 4 + 1)
    for eid, got in zip(batch.layout.entry_ids, out, strict=True):
        assert rel_err(got, run_full(pm, reqs[eid])) <= REL_TOL
    batch = batch_of(pm, reqs[1:], [1, 2, 3])  # 0 leaves, 3 joins stream 0 and computes every block
    out = merge_patches(pm.forward_batch(batch), batch.layout)
    assert pm.caches[0].layout is not None and pm.caches[0].layout.entry_ids == (3,)
    for eid, got in zip(batch.layout.entry_ids, out, strict=True):
        assert rel_err(got, run_full(pm, reqs[eid])) <= REL_TOL
