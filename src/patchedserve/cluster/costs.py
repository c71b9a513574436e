"""The simulator's cost model: how long one engine iteration takes in virtual time.

An iteration of ``Engine.step`` costs, in this order: prompt encoding of the requests admitted in
it (``encode_s`` each, from the profile), then one denoising step of the active set:

* patched systems: the predicted step latency of the whole active set (``LatencyPredictor.model_s``,
  no online correction) of the patched cost model: a calibration through the engine
  (``cluster.calibrate``), or else the scheduler's own profile (then predictions are exact);
* image-level systems: the sum over resolution groups (and samplers, as ``ImageBatch`` groups) of
  the image-level cost model's latency of that group (``cluster.calibrate``).

A system with the patch-level block cache pays a share of the patched step cost. With a measured
per-step profile (``cache_steps``, ``cluster.calibrate.measure_patch_cache_steps``: one request's
cached / exact time at each step of its trajectory) the share follows each running request's step
index (``cached_step_factor``): an image reuses by its own trajectory, and a block is skipped only
when every image reuses it. Without one, every step pays ``cache_factor``, the measured ratio over
whole staggered trajectories (``measure_patch_cache_factor``; 1 when not measured).

``admission_s``, when given, replaces the encode cost: the loop's measured time per admitted
request in a real run (``cluster.speed.admission_gap_s``), at that run's speed already.

A finished request is decoded on the engine's single decode worker (one at a time in the policy's
order, overlapping the denoising loop, as ``decode_in_thread`` does): ``decode_s(width, height)``
from the profile.
``scale`` multiplies every figure (a machine that is uniformly slower or faster than profiled);
``speed``, when given, multiplies them by a factor that varies over trace time (a shared machine
whose speed was measured during a real run, ``cluster.speed``), and ``step_noise`` makes each step
a random factor slower or faster around that (log-normal with mean 1, drawn by the replica: the
step-to-step jitter a speed trace's buckets average away). ``decode_interference`` is the
share of the loop's speed a running decode takes (measured by ``cluster.calibrate``): while the
decode worker is busy, a step advances at ``1 - decode_interference`` of its speed (on a GPU the
two share the device; on a CPU, cores and memory bandwidth). The other way round,
``decode_slowdown`` is how much longer a decode takes on the worker while the loop runs steps than
alone (measured with it, applied only when given); the replica applies it to a worker decode
that starts while the loop has work.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from patchedserve.errors import InvalidRequestError
from patchedserve.request import Request
from patchedserve.scheduler import Entry, LatencyPredictor, entry_of


def model_step_s(predictor: LatencyPredictor, entries: Sequence[Entry]) -> float:
    """The fitted model's step latency of ``entries`` together (uncorrected; 0 for none)."""
    if not entries:
        return 0.0
    return predictor.model_s(predictor.mix(entries).vector())


def step_ratio(profile: Sequence[float], step_index: int, steps: int) -> float:
    """The profile's cached / exact ratio at ``step_index`` of ``steps``: the profile was measured
    over ``len(profile)`` steps, so other lengths read it at the same point of the trajectory."""
    return profile[min(step_index * len(profile) // max(steps, 1), len(profile) - 1)]


def cached_step_factor(
    predictor: LatencyPredictor, entries: Sequence[Entry], ratios: Sequence[float]
) -> float:
    """Cached / exact time of a patched step of ``entries``, each at its own single-request ratio.

    The step's fixed cost (the model's empty-mix latency) runs whenever any image computes a
    block, so it scales by the largest ratio; each request's own share of the step (its latency
    alone minus the fixed cost) scales by its ratio. One request alone gets its ratio back.
    """
    fixed_s = predictor.model_s(predictor.mix().vector())
    own_s = [predictor.model_s(predictor.mix([e]).vector()) - fixed_s for e in entries]
    total_s = fixed_s + sum(own_s)
    if not entries or total_s <= 0.0:
        return 1.0
    return (fixed_s * max(ratios) + sum(o * r for o, r in zip(own_s, ratios, strict=True))) / total_s


@dataclass(frozen=True)
class CostModel:
    """Virtual-time costs of one system on one machine; see the module docstring."""

    step_predictor: LatencyPredictor
    """Step latency model: the patched or the image-level cost model."""
    image_level: bool
    """Price a step per resolution group (image-level execution) instead of as one patched call."""
    overhead_predictor: LatencyPredictor
    """Source of encode and decode costs (the patched profile: same text encoders and VAE)."""
    scale: float = 1.0
    """Multiplies every cost."""

    speed: Callable[[float], float] | None = None
    """Trace time (s) -> cost factor at that time; None: constant 1."""
    decode_interference: float = 0.0
    """Share of the denoising loop's speed lost while the decode worker runs, in [0, 1]."""
    decode_slowdown: float = 1.0
    """A worker decode's time beside the running loop over its time alone (>= 1)."""
    cache_factor: float = 1.0
    """Multiplies the step cost (the patch cache's measured saving; 1 without a cache)."""
    cache_steps: tuple[float, ...] = ()
    """The patch cache's per-step profile (cached / exact, one request); replaces ``cache_factor``
    where each request's step index is known."""
    step_noise: float = 0.0
    """Standard deviation of log(step time) around the model, per step (0: none)."""
    admission_s: float | None = None
    """Measured loop time per admitted request, in place of the scaled ``encode_s`` (None: that)."""

    def jitter(self, rng: random.Random) -> float:
        """One step's random cost factor: log-normal with mean 1 (1 without noise)."""
        sigma = self.step_noise
        return math.exp(rng.gauss(0.0, sigma) - 0.5 * sigma * sigma) if sigma > 0.0 else 1.0

    def step_with_decode_s(self, step_s: float, start_s: float, decoder_free_s: float) -> float:
        """Duration of a step of ``step_s`` (alone) that starts at ``start_s`` while the decode
        worker is busy until ``decoder_free_s``: slowed meanwhile, full speed after."""
        busy_s = decoder_free_s - start_s
        rate = 1.0 - self.decode_interference
        if busy_s <= 0.0 or self.decode_interference <= 0.0:
            return step_s
        if rate > 0.0 and step_s <= rate * busy_s:
            return step_s / rate
        return busy_s + (step_s - rate * busy_s)

    def factor(self, now_s: float) -> float:
        return self.scale * (self.speed(now_s) if self.speed is not None else 1.0)

    def step_s(self, running: Sequence[Request], now_s: float = 0.0) -> float:
        """One denoising step of the active set, starting at ``now_s``."""
        entries = [entry_of(r) for r in running]
        groups: dict[tuple[int, int, str], list[Entry]] = {}
        for r, e in zip(running, entries, strict=True):
            groups.setdefault((r.params.width, r.params.height, r.params.sampler), []).append(e)
        progress = [(r.step_index, r.params.steps) for r in running]
        cache = self.cache_multiplier(entries, progress)
        return self.factor(now_s) * cache * self._groups_s(list(groups.values()))

    def cache_multiplier(self, entries: Sequence[Entry], progress: Sequence[tuple[int, int]] | None) -> float:
        """What the patch cache makes of the exact cost of a step of ``entries``: from the per-step
        profile given each one's (step index, steps), else ``cache_factor``."""
        if not self.cache_steps or progress is None:
            return self.cache_factor
        ratios = [step_ratio(self.cache_steps, k, n) for k, n in progress]
        return cached_step_factor(self.step_predictor, entries, ratios)

    def base_step_s(self, entries: Sequence[Entry]) -> float:
        """One step of ``entries`` (one sampler) at factor 1: what a measured step is compared to."""
        groups: dict[tuple[int, int], list[Entry]] = {}
        for e in entries:
            groups.setdefault((e[0], e[1]), []).append(e)
        return self._groups_s(list(groups.values()))

    def _groups_s(self, groups: list[list[Entry]]) -> float:
        if not self.image_level:
            return model_step_s(self.step_predictor, [e for g in groups for e in g])
        return sum(model_step_s(self.step_predictor, g) for g in groups)

    def encode_s(self, count: int, now_s: float = 0.0) -> float:
        """Prompt encoding of ``count`` admitted requests (both branches each)."""
        if self.admission_s is not None:
            return count * self.admission_s
        return self.factor(now_s) * count * self.overhead_predictor.overhead.encode_s

    def decode_s(self, width: int, height: int, now_s: float = 0.0) -> float:
        """VAE decode of one image."""
        return self.factor(now_s) * self.overhead_predictor.overhead.decode_s(width, height)

    def worker_decode_s(self, width: int, height: int, now_s: float, loop_busy: bool) -> float:
        """VAE decode of one image on the decode worker, beside the loop's steps if ``loop_busy``."""
        return self.decode_s(width, height, now_s) * (self.decode_slowdown if loop_busy else 1.0)


@dataclass(frozen=True)
class MachineCosts:
    """Measured step costs of one machine, per execution (``cluster.calibrate``)."""

    image: LatencyPredictor | None = None
    """Image-level step cost of one resolution group; required by the image-level systems."""
    patched: LatencyPredictor | None = None
    """Patched step cost of an active set; None: the scheduler's profile stands for the machine."""
    speed: Callable[[float], float] | None = None
    """Machine speed over trace time (``CostModel.speed``); None: constant."""
    decode_interference: float = 0.0
    """Share of the loop's speed a concurrent decode takes (``CostModel.decode_interference``)."""
    patch_cache_factor: float | None = None
    """Cached / exact denoising time of the patch cache (``CostModel.cache_factor``); None: not
    measured, and cached systems are priced as exact ones."""
    step_noise: float = 0.0
    """Per-step jitter (``CostModel.step_noise``); 0: none."""
    patch_cache_steps: tuple[float, ...] = ()
    """The patch cache's per-step profile (``CostModel.cache_steps``); empty: not measured."""
    admission_s: float | None = None
    """Measured loop time per admitted request (``CostModel.admission_s``); None: the profile's."""
    decode_slowdown: float = 1.0
    """A decode's time beside the loop over alone (``CostModel.decode_slowdown``); ``load`` takes the
    patched calibration's measurement (``meta["decode_slowdown"]``). Without it the simulated end
    of denoising to image ready was about half the real one (median 0.49-0.67 of it per system
    over four real runs, session 16); with it 0.95-1.19."""

    @classmethod
    def load(cls, image: str | Path | None, patched: str | Path | None) -> MachineCosts:
        """Cost files of ``cluster.calibrate`` (either may be None); the decode contention (both
        ways) is the patched calibration's measurement."""
        image_cost = LatencyPredictor.load(image) if image else None
        patched_cost = LatencyPredictor.load(patched) if patched else None
        meta = patched_cost.meta if patched_cost else {}
        interference = float(meta.get("decode_interference", 0.0))
        factor = meta.get("patch_cache_factor")
        return cls(
            image_cost,
            patched_cost,
            None,
            interference,
            None if factor is None else float(factor),
            patch_cache_steps=tuple(float(r) for r in meta.get("patch_cache_steps", ())),
            decode_slowdown=max(float(meta.get("decode_slowdown", 1.0)), 1.0),
        )


def cost_model(
    execution: str,
    profile: LatencyPredictor,
    costs: MachineCosts,
    scale: float = 1.0,
    patch_cache: bool = False,
) -> CostModel:
    """The cost model of a system with ``execution`` (``patched`` or ``image``), with or without the
    patch cache; encode and decode costs come from ``profile``."""
    if execution == "image":
        if costs.image is None:
            raise InvalidRequestError(
                "image-level systems need an image-level cost model: pass --image-cost "
                "(written by `patchedserve bench slo` or `patchedserve bench calibrate`)",
                field="image_cost",
            )
        return CostModel(
            costs.image,
            True,
            profile,
            scale,
            costs.speed,
            costs.decode_interference,
            costs.decode_slowdown,
            step_noise=costs.step_noise,
            admission_s=costs.admission_s,
        )
    factor = costs.patch_cache_factor if patch_cache and costs.patch_cache_factor is not None else 1.0
    return CostModel(
        costs.patched or profile,
        False,
        profile,
        scale,
        costs.speed,
        costs.decode_interference,
        costs.decode_slowdown,
        cache_factor=factor,
        cache_steps=costs.patch_cache_steps if patch_cache else (),
        step_noise=costs.step_noise,
        admission_s=costs.admission_s,
    )
