"""The systems a benchmark compares, each one engine configuration of the same model.

| name           | execution | policy   | batch cap | cache                                  |
| -------------- | --------- | -------- | --------- | -------------------------------------- |
| image-fcfs     | image     | fcfs     | 1         | -                                      |
| res-batch      | image     | res-fcfs | 12        | -                                      |
| nirvana        | image     | res-fcfs | 12        | prompt-level latents (NIRVANA-style)   |
| nirvana-exact  | image     | res-fcfs | 12        | the same, hits on verbatim repeats only |
| patched-fcfs   | patched   | fcfs     | 12        | -                                      |
| mixed-cache    | patched   | fcfs     | 12        | patch-level blocks (the paper's "Mixed-Cache") |
| patchedserve   | patched   | slo      | 12        | -                                      |
| patchedserve-least-slack | patched | slo (paper's admission) | 12 | -                    |
| patchedserve-cache | patched | slo    | 12        | patch-level blocks                     |
| patchedserve-no-reserve | patched | slo (without the reserve) | 12 | -                    |
| patchedserve-no-pause | patched | slo (without pauses) | 12 | -                            |

Both caches are approximate; the systems without one produce exact images. ``patchedserve`` is
exact; ``patchedserve-cache`` adds the paper's third part, the patch-level cache (``patch.cache``,
default settings). ``patchedserve-least-slack`` is ``patchedserve`` with the paper's rule: its admission
(``SchedulerConfig.admission``) and no reserve for the tightest class (``SchedulerConfig.reserve``);
``patchedserve-no-reserve`` drops only the reserve, ``patchedserve-no-pause`` only the pauses
(``SchedulerConfig.pause``). ``mixed-cache``, ``nirvana-exact`` and the ``no-`` variants are not
in the default sweep.

Read by the real replay (``bench.replay``) and by the simulator (``cluster``), so both build the
same policy for a name, and both give every system the same deadlines (``objectives_s``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from patchedserve.bench.traces import TraceRequest
from patchedserve.engine import EngineConfig
from patchedserve.patch import PatchCacheConfig
from patchedserve.scheduler import LatencyPredictor


@dataclass(frozen=True)
class SystemSpec:
    """How one compared system serves."""

    name: str
    """Name in results and plots."""
    execution: str
    """``image`` (the model's own forward per resolution) or ``patched`` (one patched call)."""
    policy: str
    """Scheduling policy: ``fcfs``, ``res-fcfs`` (same-resolution batches) or ``slo``."""
    max_running: int | None = None
    """Batch cap; None takes the benchmark's ``--max-running``."""
    approx_cache: bool = False
    """NIRVANA-style approximate cache (start from a similar prompt's latent, skip steps)."""
    nirvana_similarity: str = "model"
    """Prompt similarity of the NIRVANA cache: ``model`` embeddings or ``exact`` repeats."""
    patch_cache: bool = False
    """Patch-level block cache (``patch.cache``, default settings; patched execution only)."""
    admission: str = "throughput"
    """How the ``slo`` policy admits (``SchedulerConfig.admission``)."""
    reserve: bool = True
    """Keep room for the tightest recent request class (``SchedulerConfig.reserve``)."""
    pause: bool = True
    """Pause requests with time to spare for urgent ones (``SchedulerConfig.pause``)."""
    inline_decode: float = 2.0
    """Decode urgent requests in the denoising loop (``SchedulerConfig.inline_decode``; 0: off)."""


SYSTEMS: dict[str, SystemSpec] = {
    s.name: s
    for s in (
        SystemSpec("image-fcfs", "image", "fcfs", max_running=1),
        SystemSpec("res-batch", "image", "res-fcfs"),
        SystemSpec("nirvana", "image", "res-fcfs", approx_cache=True),
        SystemSpec("nirvana-exact", "image", "res-fcfs", approx_cache=True, nirvana_similarity="exact"),
        SystemSpec("patched-fcfs", "patched", "fcfs"),
        SystemSpec("mixed-cache", "patched", "fcfs", patch_cache=True),
        SystemSpec("patchedserve", "patched", "slo"),
        SystemSpec("patchedserve-least-slack", "patched", "slo", admission="least-slack", reserve=False),
        SystemSpec("patchedserve-cache", "patched", "slo", patch_cache=True),
        SystemSpec("patchedserve-no-reserve", "patched", "slo", reserve=False),
        SystemSpec("patchedserve-no-pause", "patched", "slo", pause=False),
        SystemSpec("patchedserve-worker-decode", "patched", "slo", inline_decode=0.0),
    )
}
"""Every system by name, in the order results list them."""


def parse_systems(text: str) -> list[SystemSpec]:
    """``"image-fcfs,patchedserve"`` -> specs; raises ValueError naming an unknown system."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise ValueError(f"unknown system(s) {unknown or text!r}; choose from {', '.join(SYSTEMS)}")
    return [SYSTEMS[n] for n in names]


def engine_config(
    spec: SystemSpec,
    patch_size: int,
    profile: str | None,
    max_running: int = 12,
    device: str = "cpu",
    dtype: str = "float32",
) -> EngineConfig:
    """The engine configuration of ``spec``; every system loads the same profile."""
    return EngineConfig(
        patch_size=patch_size,
        policy=spec.policy,
        max_running=spec.max_running or max_running,
        execution=spec.execution,
        approx_cache=spec.approx_cache,
        approx_cache_similarity=spec.nirvana_similarity,
        patch_cache=PatchCacheConfig() if spec.patch_cache else None,
        admission=spec.admission,
        reserve=spec.reserve,
        pause=spec.pause,
        inline_decode=spec.inline_decode,
        profile=profile,
        device=device,
        dtype=dtype,
    )


def objectives_s(requests: Sequence[TraceRequest], predictor: LatencyPredictor) -> list[float]:
    """Each request's objective (deadline - arrival, seconds): its ``slo_scale`` x its standalone
    latency from the shared profile, without online correction, so every system, real or
    simulated, is held to the same deadlines (they are sent as ``slo_ms``)."""
    return [
        r.slo_scale
        * predictor.predict_standalone(r.width, r.height, r.steps, r.guidance_scale > 1.0, corrected=False)
        for r in requests
    ]
