"""Discrete-event simulation of a trace on N replicas of one system, in virtual time.

Events are arrivals (dispatched at once by ``LeastLoadDispatcher``) and iteration ends of the
replicas (``SimReplica.iterate``); the earliest goes first, an arrival before an iteration that
starts at the same instant. The run stops like the real replay: at the last deadline of the
trace, what is still queued or running is cancelled (decodes in flight complete). Each request
gets the same objective as in the real replay (``bench.systems.objectives_s``), so outcomes go
through the same ``bench.metrics``.

NIRVANA's skips come from the engine's own ``ApproxCache`` fed prompt embeddings: the model's
mean token embeddings (``ModelEmbedder``: what the real engine compares), or random unit vectors
per distinct prompt (``exact_embedder``: only verbatim repeats hit), for models not at hand.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from patchedserve.bench.metrics import RequestOutcome
from patchedserve.bench.systems import SystemSpec
from patchedserve.bench.traces import TraceRequest
from patchedserve.cluster.costs import MachineCosts, cost_model
from patchedserve.cluster.dispatch import LeastLoadDispatcher
from patchedserve.cluster.replica import Embedder, SimReplica, make_policy
from patchedserve.engine.approx_cache import ApproxCache, prompt_vector
from patchedserve.models.validation import GenerationParams
from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler import LatencyPredictor

if TYPE_CHECKING:  # the simulator runs without the model code unless it embeds prompts with a model
    from patchedserve.models import ModelBundle


@dataclass(frozen=True)
class SimConfig:
    """How the simulated engines are built."""

    replicas: int = 1
    """Engines behind the dispatcher."""
    patch_size: int = 256
    """Patch side in pixels (request patch counts)."""
    max_running: int = 12
    """Batch cap of the batching systems."""
    max_waiting: int = 256
    """Queue bound per replica (as ``EngineConfig.max_waiting``)."""
    cost_scale: float = 1.0
    """Multiplies every cost (``CostModel.scale``)."""
    noise_seed: int = 0
    """Seed of the per-step jitter draws (replica ``i`` draws from ``1000 * noise_seed + i``)."""

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_running < 1 or not self.cost_scale > 0.0:
            raise ValueError("replicas and max_running must be >= 1 and cost_scale positive")
        if self.noise_seed < 0:
            raise ValueError("noise_seed must be >= 0")


class ModelEmbedder:
    """Prompt -> the mean token embedding of the model's conditional prompt encoding (memoised).

    ``simulate`` encodes a trace's new prompts up front, ``batch`` at a time, rather than one
    encoder call per prompt as requests arrive: prompts are padded to the encoders' fixed length,
    so a prompt's encoding does not depend on its batch mates."""

    def __init__(self, bundle: ModelBundle, batch: int = 64) -> None:
        self.bundle = bundle
        self.batch = batch
        self.memo: dict[str, torch.Tensor] = {}

    def encode(self, prompts: Iterable[str]) -> None:
        """Encodes the prompts not seen yet."""
        from patchedserve.models import encode_prompts

        new = list(dict.fromkeys(p for p in prompts if p not in self.memo))
        with torch.inference_mode():
            for start in range(0, len(new), self.batch):
                chunk = new[start : start + self.batch]
                for prompt, cond in zip(chunk, encode_prompts(self.bundle, chunk), strict=True):
                    self.memo[prompt] = cond.prompt_embeds.float().mean(0).cpu()  # [D]

    def __call__(self, prompt: str) -> torch.Tensor:  # [D]
        if prompt not in self.memo:
            self.encode([prompt])
        return self.memo[prompt]


def exact_embedder(dim: int = 4096) -> Embedder:
    """Prompt -> ``approx_cache.prompt_vector``: distinct prompts nearly orthogonal, equal ones
    identical (NIRVANA hits on verbatim repeats only)."""
    memo: dict[str, torch.Tensor] = {}

    def embed(prompt: str) -> torch.Tensor:  # [D]
        if prompt not in memo:
            memo[prompt] = prompt_vector(prompt, dim)
        return memo[prompt]

    return embed


def _request(i: int, r: TraceRequest, objective_s: float, patch_size: int) -> Request:
    params = GenerationParams(r.width, r.height, r.steps, r.guidance_scale, r.sampler, r.seed)
    patches = -(-r.width // patch_size) * -(-r.height // patch_size)
    return Request(
        request_id=i,
        prompt=r.prompt,
        negative_prompt="",
        params=params,
        arrival_s=r.arrival_s,
        num_patches=patches,
        slo_ms=1000.0 * objective_s,
    )


def build_replicas(
    spec: SystemSpec,
    profile: LatencyPredictor,
    costs: MachineCosts,
    config: SimConfig,
    embed: Embedder | None,
) -> list[SimReplica]:
    """``config.replicas`` fresh engines of ``spec``, each with its own predictor copy and cache."""
    cost = cost_model(spec.execution, profile, costs, config.cost_scale, spec.patch_cache)
    replicas = []
    for index in range(config.replicas):
        own = LatencyPredictor.from_dict(profile.to_dict())  # each engine loads the profile itself
        policy = make_policy(spec, own, config.max_running)
        cache = ApproxCache() if spec.approx_cache else None
        seed = 1000 * config.noise_seed + index
        replicas.append(SimReplica(policy, cost, config.max_waiting, cache, embed if cache else None, seed))
    return replicas


def simulate(
    requests: Sequence[TraceRequest],
    objectives_s: Sequence[float],
    spec: SystemSpec,
    profile: LatencyPredictor,
    costs: MachineCosts | None = None,
    config: SimConfig = SimConfig(),
    embed: Embedder | None = None,
) -> list[RequestOutcome]:
    """Replays ``requests`` on ``config.replicas`` simulated engines of ``spec``; one outcome each.

    ``profile`` is the schedulers' latency model (as the real engines load it); ``costs`` is what
    the simulated machine really spends (``MachineCosts``; default: the profile, no image cost)."""
    if spec.approx_cache and (embed is None or spec.nirvana_similarity == "exact"):
        embed = exact_embedder()
    if isinstance(embed, ModelEmbedder):
        embed.encode(r.prompt for r in requests)
    replicas = build_replicas(spec, profile, costs or MachineCosts(), config, embed)
    dispatcher = LeastLoadDispatcher(profile)
    sim = [
        _request(i, r, o, config.patch_size)
        for i, (r, o) in enumerate(zip(requests, objectives_s, strict=True))
    ]
    cutoff_s = max((r.arrival_s + o for r, o in zip(requests, objectives_s, strict=True)), default=0.0)
    rejected: set[int] = set()
    i = 0
    while True:
        arrival_s = sim[i].arrival_s if i < len(sim) else math.inf
        busy = [rep for rep in replicas if rep.next_s is not None]
        rep = min(busy, key=lambda x: x.next_s or 0.0) if busy else None
        next_s = rep.next_s if rep is not None and rep.next_s is not None else math.inf
        if arrival_s == math.inf and next_s == math.inf:
            break
        if arrival_s <= next_s:
            if not replicas[dispatcher.choose(replicas)].submit(sim[i], arrival_s):
                rejected.add(i)
            i += 1
        elif next_s > cutoff_s or rep is None:
            break
        else:
            rep.iterate(next_s)
    for rep in replicas:
        rep.close()
    return [
        _outcome(r, t, o, r.request_id in rejected)
        for r, t, o in zip(sim, requests, objectives_s, strict=True)
    ]


_STATUS = {
    RequestStatus.FINISHED: "finished",
    RequestStatus.DROPPED: "dropped",
    RequestStatus.CANCELLED: "cancelled",
    RequestStatus.FAILED: "failed",
}


def _outcome(r: Request, t: TraceRequest, objective_s: float, rejected: bool) -> RequestOutcome:
    if rejected:
        return RequestOutcome(r.request_id, t.size, t.arrival_s, "rejected", None, objective_s)
    status = _STATUS.get(r.status, "cancelled")
    latency_s = denoised_s = None
    if status == "finished" and r.timings.finished_s is not None:
        latency_s = r.timings.finished_s - r.arrival_s
        if r.timings.denoised_s is not None:
            denoised_s = r.timings.denoised_s - r.arrival_s
    return RequestOutcome(r.request_id, t.size, t.arrival_s, status, latency_s, objective_s, denoised_s)
