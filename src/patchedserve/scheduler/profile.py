"""Profiling: time random mixes on the patched model, fit the ``LatencyPredictor``, report its error.

``run_profile`` is what ``patchedserve profile`` runs (about 200 mixes); ``profile_quick`` is what
the server runs at start-up when it was given no profile (two dozen small mixes, seconds). Both
time ``PatchedModel.forward_batch`` on random inputs shaped like real requests (the model's own
prompt encoding gives the text shapes).

Noise on a shared machine, and what is done about it:

* Clock: on a CPU with one intra-op thread, the calling thread's CPU time (``thread_time``) is
  the step's compute time without the time slices other processes take, i.e. the wall time of an
  unshared machine; elsewhere (GPU, several threads) wall time, synchronised.
* Order: the mixes run in interleaved rounds, so a burst of load lands on one repeat of many
  mixes rather than on every repeat of a few; each mix keeps the median of its repeats.
* Drift: what remains is mostly slow drift of the machine's speed, removed by
  ``fitting.fit_with_drift``.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import Any

import torch

from patchedserve.models import ModelBundle
from patchedserve.patch import PatchBatch, PatchedModel
from patchedserve.scheduler.config import DEFAULT_PATCH_SIZE, ProfileConfig
from patchedserve.scheduler.features import FEATURE_NAMES, Entry
from patchedserve.scheduler.fitting import TimedRun, error_report, fit_with_drift
from patchedserve.scheduler.predictor import LatencyPredictor, Overhead, StepSample

QUICK = ProfileConfig(mixes=24, sizes=((256, 256), (512, 256), (512, 512)), max_requests=6, repeats=1)
"""The start-up profile: small mixes only, a few seconds for the tiny models on a CPU."""


@dataclass
class ProfileResult:
    """A fitted predictor with the evidence for it."""

    predictor: LatencyPredictor
    """Fitted on the training split."""
    train: list[StepSample]
    """Mixes the fit saw."""
    test: list[StepSample]
    """Held-out mixes."""
    report: dict[str, Any] = field(default_factory=dict)
    """Error figures, sizes, wall time (what ``--json`` writes)."""


def draw_mixes(config: ProfileConfig, rng: random.Random) -> list[tuple[Entry, ...]]:
    """Random mixes: 1..max_requests requests, each a random size with CFG on or off."""
    mixes = []
    for _ in range(config.mixes):
        n = rng.randint(1, config.max_requests)
        mix = tuple((*rng.choice(config.sizes), rng.random() < config.cfg_share) for _ in range(n))
        mixes.append(mix)
    return mixes


class BatchMaker:
    """Random ``PatchBatch``es for mixes, with the model's real conditioning shapes."""

    def __init__(self, bundle: ModelBundle, pm: PatchedModel, seed: int) -> None:
        from patchedserve.models.text import encode_prompts

        self.pm = pm
        self.device = bundle.device
        self.dtype = bundle.dtype
        self.channels = bundle.latent_channels
        cond = encode_prompts(bundle, [""])[0]
        self.text = cond.prompt_embeds  # [L, D]
        self.pooled = cond.pooled  # [Dp] or None
        self.has_time_ids = bundle.family == "sdxl"
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, mix: Sequence[Entry]) -> PatchBatch:
        sizes = [(h, w) for w, h, cfg in mix for _ in range(2 if cfg else 1)]  # one per entry
        layout = self.pm.layout_for(sizes)
        r, p = len(sizes), self.pm.latent_patch
        g = self.generator
        patches = torch.randn(layout.num_patches, self.channels, p, p, generator=g)  # [N, C, p, p]
        batch = PatchBatch(
            layout=layout,
            patches=patches.to(self.device, self.dtype),
            timesteps=(torch.rand(r, generator=g) * 999).to(self.device),  # [R]
            encoder_hidden_states=self.text.expand(r, -1, -1).contiguous(),  # [R, L, D]
        )
        if self.pooled is not None:
            batch.pooled = self.pooled.expand(r, -1).contiguous()  # [R, Dp]
        if self.has_time_ids:
            f = self.pm.vae_scale_factor
            ids = [[h * f, w * f, 0, 0, h * f, w * f] for h, w in layout.sizes]  # layout order
            batch.time_ids = torch.tensor(ids, dtype=self.dtype, device=self.device)  # [R, 6]
        return batch


def make_clock(device: torch.device, clock: str) -> Callable[[], float]:
    """The timer for ``clock`` (``thread``, ``wall`` or ``auto``; see the module docstring)."""
    if resolve_clock(device, clock) == "thread":
        if device.type != "cpu":
            raise ValueError("the thread clock only measures CPU work; use wall on accelerators")
        return time.thread_time
    if device.type == "cuda":

        def synchronised() -> float:
            torch.cuda.synchronize(device)
            return time.perf_counter()

        return synchronised
    return time.perf_counter


def resolve_clock(device: torch.device, clock: str) -> str:
    if clock == "auto":
        return "thread" if device.type == "cpu" and torch.get_num_threads() == 1 else "wall"
    return clock


def time_mixes(
    pm: PatchedModel, make: BatchMaker, mixes: Sequence[tuple[Entry, ...]], repeats: int, clock: str
) -> list[TimedRun]:
    """Times every mix ``repeats`` times in interleaved rounds, after a warm-up; runs in time order."""
    timer = make_clock(make.device, clock)
    batches = [make(mix) for mix in mixes]
    for batch in batches[:3]:
        pm.forward_batch(batch)
    runs = []
    for _ in range(repeats):
        for i, batch in enumerate(batches):
            start = timer()
            pm.forward_batch(batch)
            runs.append(TimedRun(i, timer() - start))
    return runs


def measure_overhead(
    bundle: ModelBundle, sizes: Sequence[tuple[int, int]], clock: str = "auto", repeats: int = 3
) -> Overhead:
    """Median prompt-encoding time, and VAE decode time as base + per-megapixel cost over ``sizes``."""
    from patchedserve.models.text import encode_prompts
    from patchedserve.models.vae import decode_latents

    timer = make_clock(bundle.device, clock)

    def median_time(fn: Callable[[], object]) -> float:
        fn()
        runs = []
        for _ in range(repeats):
            start = timer()
            fn()
            runs.append(timer() - start)
        return statistics.median(runs)

    encode_s = median_time(lambda: encode_prompts(bundle, ["a photo of a cat", ""], negative=[False, True]))
    f, c = bundle.vae_scale_factor, bundle.latent_channels
    points = []
    for w, h in sorted(set(sizes), key=lambda s: s[0] * s[1]):
        latents = torch.randn(1, c, h // f, w // f, device=bundle.device, dtype=bundle.dtype)
        points.append((w * h / 1e6, median_time(partial(decode_latents, bundle, latents))))
    if len(points) == 1:
        return Overhead(encode_s=encode_s, decode_s_per_mpx=points[0][1] / points[0][0])
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    slope, base = statistics.linear_regression(xs, ys)
    if base < 0.0:  # keep the parts non-negative: all of it per pixel
        slope, base = sum(ys) / sum(xs), 0.0
    return Overhead(encode_s=encode_s, decode_base_s=base, decode_s_per_mpx=max(slope, 0.0))


def run_profile(
    bundle: ModelBundle,
    config: ProfileConfig | None = None,
    pm: PatchedModel | None = None,
    with_overhead: bool = True,
) -> ProfileResult:
    """Times ``config.mixes`` random mixes, fits on a training split, measures the held-out error.

    Args:
        bundle: the model, already on its device and dtype.
        config: what to measure (default ``ProfileConfig()``).
        pm: the patched model to time (default: a new one over ``bundle.denoiser``).
        with_overhead: also measure prompt encoding and VAE decoding.
    """
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    config = ProfileConfig() if config is None else config
    if pm is None:
        pm = PatchedModel(
            bundle.denoiser, patch_size=config.patch_size, vae_scale_factor=bundle.vae_scale_factor
        )
    rng = random.Random(config.seed)
    mixes = draw_mixes(config, rng)
    clock = resolve_clock(bundle.device, config.clock)
    runs = time_mixes(pm, BatchMaker(bundle, pm, config.seed), mixes, config.repeats, clock)
    order = list(range(len(mixes)))
    rng.shuffle(order)
    n_test = max(1, round(config.test_fraction * len(mixes)))
    test, train = sorted(order[:n_test]), sorted(order[n_test:])
    fitted, labels, raw = fit_with_drift(mixes, runs, train, pm.patch_size, config.drift_window)
    meta = {
        "model": bundle.name,
        "family": bundle.family,
        "device": str(bundle.device),
        "dtype": str(bundle.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "streams": pm.streams,
        "clock": clock,
        "config": {**asdict(config), "sizes": [list(s) for s in config.sizes]},
    }
    overhead = measure_overhead(bundle, config.sizes, clock) if with_overhead else Overhead()
    predictor = LatencyPredictor(fitted.coef, pm.patch_size, overhead=overhead, meta=meta)
    report: dict[str, Any] = error_report(predictor, mixes, labels, raw, train, test)
    report |= {"n_train": len(train), "n_test": len(test), "noise_pct": _noise_pct(runs)}
    report |= {"coef": dict(zip(FEATURE_NAMES, predictor.coef, strict=True)), "overhead": asdict(overhead)}
    report |= {
        "wall_s": time.perf_counter() - start_wall,
        "cpu_s": time.process_time() - start_cpu,
        "meta": meta,
    }
    return ProfileResult(
        predictor,
        [StepSample(mixes[i], labels[i]) for i in train],
        [StepSample(mixes[i], labels[i]) for i in test],
        report,
    )


def _noise_pct(runs: Sequence[TimedRun]) -> float:
    """Median over mixes of (max - min) / median of its repeats: the raw measurement noise."""
    per_mix: dict[int, list[float]] = {}
    for run in runs:
        per_mix.setdefault(run.mix, []).append(run.seconds)
    spreads = [(max(t) - min(t)) / statistics.median(t) for t in per_mix.values() if len(t) > 1]
    return 100.0 * statistics.median(spreads) if spreads else 0.0


def profile_quick(bundle: ModelBundle, pm: PatchedModel | None = None, seed: int = 0) -> LatencyPredictor:
    """A rough predictor in seconds, for a server started without ``--profile``.

    The online update corrects its scale within a few dozen steps; its shape (how large mixes
    cost) is extrapolated from small ones, so a real profile is better.
    """
    p = pm.patch_size if pm is not None else DEFAULT_PATCH_SIZE
    sizes = tuple((-(-w // p) * p, -(-h // p) * p) for w, h in QUICK.sizes)  # multiples of the patch
    config = replace(QUICK, patch_size=p, sizes=sizes, seed=seed)
    result = run_profile(bundle, config, pm=pm, with_overhead=False)
    predictor = LatencyPredictor.fit(
        [*result.train, *result.test],
        result.predictor.patch_size,
        meta={**result.predictor.meta, "quick": True},
    )
    return predictor
