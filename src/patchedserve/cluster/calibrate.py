"""Machine cost of a denoising step, measured through the engine's own batches, for the simulator.

The latency profile (``patchedserve profile``) is the *scheduler's* model: what ``slo`` predicts
with and what deadlines derive from. The simulator also needs the *machine's* cost, and for the
image-level systems a model of a different execution altogether. ``calibrate_all`` times real steps of
prepared requests (prompt encoding, sampler and all, as ``Engine.step`` runs them):

* ``image``: ``ImageBatch`` steps of single-size groups of 1..12 requests (an image-level step
  costs the sum over its resolution groups, ``cluster.costs``);
* ``patched``: ``DenoiseBatch`` steps of random mixes of the sizes, 1..12 requests; how much
  of the denoising loop's speed a concurrent VAE decode takes, and how much slower that decode
  runs beside the loop than alone (``measure_decode_contention``);
  and what the patch cache costs: per step of one request's trajectory
  (``measure_patch_cache_steps``), levelled to staggered batches (``batch_level``).

Both fit the ``LatencyPredictor`` form (features counted in patches of the profile's patch size),
stored as profile JSON with ``meta.execution``. Measuring both right before a benchmark, their
groups in alternation (``calibrate_all``), prices them under the same machine conditions, which on
a shared machine differ from those of a profile taken earlier. Run by ``bench slo`` and ``bench
calibrate``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from patchedserve.cluster.costs import cached_step_factor, step_ratio
from patchedserve.engine.batch import DenoiseBatch
from patchedserve.engine.image_batch import ImageBatch
from patchedserve.engine.prepare import Preparer
from patchedserve.models import ModelBundle, validate_generation
from patchedserve.patch import PatchCacheConfig, PatchedModel
from patchedserve.request import Request
from patchedserve.scheduler import Entry, LatencyPredictor, Overhead, StepSample, entry_of


@dataclass(frozen=True)
class Calibration:
    """What ``calibrate_all`` measures."""

    sizes: tuple[tuple[int, int], ...] = ((256, 256), (512, 256), (512, 512))
    """(width, height) in pixels of the requests."""
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 12)
    """Requests per group (image) or per mix (patched; drawn from these)."""
    mixes: int = 16
    """Random mixes timed for ``patched``."""
    guidance_scale: float = 5.0
    """CFG scale of the requests (> 1: both branches, as the traces use)."""
    sampler: str = "euler"
    """Sampler of the requests."""
    repeats: int = 3
    """Timed steps per group or mix after one warm-up step; the median is kept."""
    patch_size: int = 256
    """Patch side of the patched model, and the unit the features are counted in."""
    seed: int = 0
    """Seed of the patched mixes."""
    steps: int = 8
    """Trajectory length for the patch cache's saving (the traces' step count)."""
    cache_mixes: int = 4
    """Random mixes run as whole trajectories, exact and cached, for the patch cache's saving."""


def _requests(
    bundle: ModelBundle, sizes: Sequence[tuple[int, int]], config: Calibration, steps: int = 0
) -> list[Request]:
    lp = config.patch_size
    requests = []
    for i, (w, h) in enumerate(sizes):
        params = validate_generation(
            bundle, w, h, steps or config.repeats + 1, config.guidance_scale, config.sampler, i
        )
        patches = -(-w // lp) * -(-h // lp)
        requests.append(
            Request(request_id=i, prompt=f"calibration {i}", negative_prompt="", params=params,
                    arrival_s=0.0, num_patches=patches)
        )  # fmt: skip
    return requests


def time_steps(bundle: ModelBundle, batch: DenoiseBatch | ImageBatch, requests: list[Request]) -> list[float]:
    """Seconds of each step of ``requests`` run together in ``batch`` (the first one warms up)."""
    batch.sync(requests)
    return [timed_step(bundle, batch) for _ in range(requests[0].params.steps)]


def timed_step(bundle: ModelBundle, batch: DenoiseBatch | ImageBatch) -> float:
    """Seconds of one ``batch.step()`` (synchronised on CUDA)."""
    cuda = bundle.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(bundle.device)
    start = time.perf_counter()
    batch.step()
    if cuda:
        torch.cuda.synchronize(bundle.device)
    return time.perf_counter() - start


def _groups(config: Calibration, execution: str) -> list[list[tuple[int, int]]]:
    """The request sizes of each timed step: single-size groups (image) or random mixes (patched)."""
    if execution == "image":
        return [[size] * count for size in config.sizes for count in config.batch_sizes]
    rng = random.Random(config.seed)
    return [
        [rng.choice(config.sizes) for _ in range(rng.choice(config.batch_sizes))] for _ in range(config.mixes)
    ]


def calibrate_all(
    bundle: ModelBundle,
    executions: Sequence[str],
    config: Calibration = Calibration(),
    overhead: Overhead | None = None,
) -> dict[str, LatencyPredictor]:
    """Times steps of each execution (``image``, ``patched``) and fits a step model on them; the
    executions' groups are timed in alternation.

    One after the other, the image and the patched groups would each meet the machine as it was
    during their own minute or two; on a shared machine that put two cost files of one calibration
    4-13% apart (session 9). Alternating them spreads any drift over both.
    """
    start = time.perf_counter()
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    pm = PatchedModel(bundle.denoiser, config.patch_size, bundle.vae_scale_factor)
    cfg = config.guidance_scale > 1.0
    samples: dict[str, list[StepSample]] = {e: [] for e in executions}
    for execution, sizes in _alternate({e: _groups(config, e) for e in executions}):
        requests = _requests(bundle, sizes, config)
        preparer.prepare(requests)
        batch: DenoiseBatch | ImageBatch
        if execution == "image":
            batch = ImageBatch(bundle, preparer.samplers, bundle.device)
        else:
            batch = DenoiseBatch(pm, preparer.samplers, bundle.device)
        times = time_steps(bundle, batch, requests)
        entries: tuple[Entry, ...] = tuple((w, h, cfg) for w, h in sizes)
        samples[execution].append(StepSample(entries, statistics.median(times[1:])))
    timed_s = time.perf_counter() - start
    return {e: _fit(bundle, e, samples[e], config, overhead, preparer, pm, timed_s) for e in executions}


def _alternate(
    groups: dict[str, list[list[tuple[int, int]]]],
) -> list[tuple[str, list[tuple[int, int]]]]:
    """Every execution's groups in one sequence, each spread evenly over it (by its share)."""
    keyed = [((i + 0.5) / len(g), e, sizes) for e, g in groups.items() for i, sizes in enumerate(g)]
    return [(e, sizes) for _, e, sizes in sorted(keyed, key=lambda k: (k[0], k[1]))]


def _fit(
    bundle: ModelBundle,
    execution: str,
    samples: list[StepSample],
    config: Calibration,
    overhead: Overhead | None,
    preparer: Preparer,
    pm: PatchedModel,
    timed_s: float,
) -> LatencyPredictor:
    """The step model of one execution from its timed groups, with the patched path's extras."""
    start = time.perf_counter()
    meta = {
        "execution": execution,
        "model": bundle.name,
        "device": str(bundle.device),
        "threads": torch.get_num_threads(),
        "streams": pm.streams,
        "calibration": {**asdict(config), "sizes": [list(s) for s in config.sizes]},
    }
    if execution == "patched":
        meta["decode_interference"], meta["decode_slowdown"] = measure_decode_contention(
            bundle, preparer, pm, config
        )
        paired, meta["patch_cache_reuse"] = staggered_cache_steps(bundle, preparer, config)
        meta["patch_cache_factor"] = cached_over_exact(paired)
        alone = measure_patch_cache_steps(bundle, preparer, config)
    meta["wall_s"] = timed_s + time.perf_counter() - start
    predictor = LatencyPredictor.fit(samples, config.patch_size, overhead=overhead, meta=meta)
    if execution == "patched":
        level = batch_level(predictor, alone, paired)
        predictor.meta["patch_cache_steps_alone"] = alone
        predictor.meta["patch_cache_batch_level"] = level
        predictor.meta["patch_cache_steps"] = [level * r for r in alone]
    errors = [abs(predictor.predict_step(s.entries) / s.latency_s - 1.0) for s in samples]
    predictor.meta["fit_mape_pct"] = 100.0 * sum(errors) / len(errors)
    predictor.meta["samples"] = [
        {"entries": [list(e) for e in s.entries], "latency_s": s.latency_s} for s in samples
    ]
    return predictor


def measure_decode_contention(
    bundle: ModelBundle, preparer: Preparer, pm: PatchedModel, config: Calibration, steps: int = 12
) -> tuple[float, float]:
    """How the denoising loop and the decode worker slow each other: (interference, slowdown).

    Times ``steps`` patched steps of one largest-size request alone and decodes of that size alone,
    then both at once: the steps while another thread decodes back to back (as the engine's decode
    worker does), timing those decodes too. ``interference`` is the share of the loop's speed lost
    (``1 - alone / with_decode``, clipped to [0, 1]); ``slowdown`` is a decode's time beside the
    loop over its time alone (at least 1). On a CPU the two share cores and memory bandwidth; on a
    GPU they share the device.
    """
    import threading

    from patchedserve.models import decode_latents

    size = max(config.sizes, key=lambda s: s[0] * s[1])
    requests = _requests(bundle, [size], config, steps=steps + 1)
    preparer.prepare(requests)
    batch = DenoiseBatch(pm, preparer.samplers, bundle.device)
    alone_s = statistics.median(time_steps(bundle, batch, requests)[1:])  # the first one warms up
    f = bundle.vae_scale_factor
    latents = torch.randn(1, bundle.latent_channels, size[1] // f, size[0] // f, dtype=bundle.dtype)
    latents = latents.to(bundle.device)

    def decode_s() -> float:  # PIL images are on the host: the decode is over when it returns
        start = time.perf_counter()
        decode_latents(bundle, latents)
        return time.perf_counter() - start

    decode_s()  # warm-up
    decode_alone_s = statistics.median(decode_s() for _ in range(3))
    stop = threading.Event()
    beside: list[float] = []

    def decode_loop() -> None:
        while not stop.is_set():
            beside.append(decode_s())

    requests[0].step_index = 0
    worker = threading.Thread(target=decode_loop, daemon=True)
    worker.start()
    try:
        busy = time_steps(bundle, batch, requests)[1:]
    finally:
        stop.set()
        worker.join()
    interference = min(max(1.0 - alone_s / statistics.median(busy), 0.0), 1.0)
    # The last decode may have run on after the steps; the first ones overlapped them throughout.
    overlapped = beside[:-1] or beside
    if not overlapped:  # the steps ended before the worker began a decode
        return interference, 1.0
    return interference, max(statistics.median(overlapped) / decode_alone_s, 1.0)


PairedStep = tuple[list[Entry], list[tuple[int, int]], float, float]
"""One step of a staggered mix: entries, their (step index, steps), exact and cached seconds."""


def measure_patch_cache_factor(
    bundle: ModelBundle, preparer: Preparer, config: Calibration, cache: PatchCacheConfig | None = None
) -> tuple[float, float]:
    """Cached / exact denoising time as requests come and go, and the share of patch-block
    computations the cache reused (``staggered_cache_steps``, summed)."""
    steps, reuse = staggered_cache_steps(bundle, preparer, config, cache)
    return cached_over_exact(steps), reuse


def cached_over_exact(steps: Sequence[PairedStep]) -> float:
    """Summed cached over summed exact seconds of paired steps."""
    return sum(s[3] for s in steps) / sum(s[2] for s in steps)


def _exact_and_cached(
    bundle: ModelBundle, config: Calibration, cache: PatchCacheConfig | None
) -> tuple[PatchedModel, PatchedModel]:
    """An exact patched model and one with the patch cache (default settings unless ``cache``)."""
    exact = PatchedModel(bundle.denoiser, config.patch_size, bundle.vae_scale_factor)
    cached = PatchedModel(
        bundle.denoiser, config.patch_size, bundle.vae_scale_factor, cache=cache or PatchCacheConfig()
    )
    return exact, cached


def staggered_cache_steps(
    bundle: ModelBundle, preparer: Preparer, config: Calibration, cache: PatchCacheConfig | None = None
) -> tuple[list[PairedStep], float]:
    """Every step of ``config.cache_mixes`` random mixes served exact and cached, and the share of
    patch-block computations the cache reused.

    Each mix is served as a serving engine would see it: one request joins per step, each leaves
    after ``config.steps`` steps, so the batch changes at most steps (the cache then carries its
    buffers across). Exact and cached run back to back per mix, after one warm-up mix of each; the
    schedule is the same, so their steps pair up.
    """
    exact, cached = _exact_and_cached(bundle, config, cache)
    rng = random.Random(config.seed + 1)
    mixes = [
        [rng.choice(config.sizes) for _ in range(rng.choice(config.batch_sizes))]
        for _ in range(config.cache_mixes)
    ]
    paired: list[PairedStep] = []
    for k, sizes in enumerate([mixes[0], *mixes]):
        runs = []
        for pm in (exact, cached):
            pm.clear_cache()
            requests = _requests(bundle, sizes, config, config.steps)
            runs.append(_serve_staggered(bundle, preparer, pm, requests))
        if k > 0:  # the first mix of each warms up
            paired += [(e, p, exact_s, c[2]) for (e, p, exact_s), c in zip(*runs, strict=True)]
    return paired, cached.cache_stats().reuse_fraction


def batch_level(predictor: LatencyPredictor, profile: Sequence[float], paired: Sequence[PairedStep]) -> float:
    """Measured over priced cached time of staggered steps, with the step cost of ``predictor`` and
    the per-step ``profile`` of one request alone: what the cache costs in a batch beyond that
    (its comparisons and sub-batches grow with the batch). Scales the profile for serving."""
    priced_s = sum(
        exact_s * cached_step_factor(predictor, entries, [step_ratio(profile, k, n) for k, n in progress])
        for entries, progress, exact_s, _ in paired
    )
    return sum(s[3] for s in paired) / priced_s


def measure_patch_cache_steps(
    bundle: ModelBundle, preparer: Preparer, config: Calibration, cache: PatchCacheConfig | None = None
) -> list[float]:
    """Cached / exact time of each step of one request's ``config.steps``-step trajectory.

    Under ``granularity="image"`` an image's reuse depends on its own trajectory only, so its step
    cost follows its step index: full (plus the cache's comparisons) while the latents change fast,
    a few per cent where every block is reused. Each size runs alone, exact and cached back to
    back, ``config.repeats`` times after one warm-up; per step, the median over sizes of the ratio
    of median times. ``cluster.costs`` prices mixed batches from it (``cached_step_factor``).
    """
    exact, cached = _exact_and_cached(bundle, config, cache)
    per_size: list[list[float]] = []
    for size in config.sizes:
        times: dict[str, list[list[float]]] = {"exact": [], "cached": []}
        for _ in range(config.repeats + 1):
            for name, pm in (("exact", exact), ("cached", cached)):
                pm.clear_cache()
                requests = _requests(bundle, [size], config, config.steps)
                preparer.prepare(requests)
                batch = DenoiseBatch(pm, preparer.samplers, bundle.device)
                times[name].append(time_steps(bundle, batch, requests))
        exact_s, cached_s = (
            [statistics.median(step) for step in zip(*runs[1:], strict=True)] for runs in times.values()
        )
        per_size.append([c / e for c, e in zip(cached_s, exact_s, strict=True)])
    return [statistics.median(ratios) for ratios in zip(*per_size, strict=True)]


def _serve_staggered(
    bundle: ModelBundle, preparer: Preparer, pm: PatchedModel, requests: list[Request]
) -> list[tuple[list[Entry], list[tuple[int, int]], float]]:
    """Each denoising step (entries, their (step index, steps), seconds) while ``requests`` join
    one per step and leave when done."""
    preparer.prepare(requests)
    batch = DenoiseBatch(pm, preparer.samplers, bundle.device)
    waiting, running, steps = list(requests), list[Request](), []
    while waiting or running:
        if waiting:
            running.append(waiting.pop(0))
        batch.sync(running)
        progress = [(r.step_index, r.params.steps) for r in running]
        steps.append(([entry_of(r) for r in running], progress, timed_step(bundle, batch)))
        running = [r for r in running if r.step_index < r.params.steps]
    return steps
