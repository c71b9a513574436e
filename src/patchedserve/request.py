"""Requests: what a user asks for (``GenerationRequest``) and what the engine tracks (``Request``).

``GenerationRequest`` uses the reference pipeline's field names; unset fields take the model's
defaults. ``Request`` is the engine's mutable record of one admitted generation: status, progress,
deadline and per-stage timings. Created by the engine, moved between states by the scheduler and
the engine loop, read by the server and the benchmark.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from patchedserve.models.validation import GenerationParams


@dataclass(frozen=True)
class GenerationRequest:
    """One image to generate."""

    prompt: str
    """Text to generate from."""
    negative_prompt: str = ""
    """Text to steer away from (the unconditional branch of classifier-free guidance)."""
    width: int | None = None
    """Image width in pixels; None means the model's default."""
    height: int | None = None
    """Image height in pixels; None means the model's default."""
    steps: int | None = None
    """Denoising steps; None means the model's default."""
    guidance_scale: float | None = None
    """Classifier-free guidance scale; <= 1 skips the unconditional pass; None means the default."""
    seed: int = 0
    """Seed of the initial noise."""
    sampler: str | None = None
    """Sampler name; None means the model's default."""
    slo_ms: float | None = None
    """Latency objective in milliseconds from arrival; None lets the scheduler derive one."""


class RequestStatus(enum.IntEnum):
    """Lifecycle of a request. Every state from FINISHED on is final."""

    WAITING = 0
    RUNNING = 1
    FINISHED = 2
    DROPPED = 3
    CANCELLED = 4
    FAILED = 5

    @property
    def is_final(self) -> bool:
        return self >= RequestStatus.FINISHED


@dataclass
class RequestTimings:
    """Wall-clock instants (seconds, engine clock) of one request's stages; None until reached."""

    arrival_s: float
    admitted_s: float | None = None
    """When the scheduler admitted it (its prompt encoding starts then)."""
    encoded_s: float | None = None
    first_step_s: float | None = None
    denoised_s: float | None = None
    finished_s: float | None = None

    def as_dict(self) -> dict[str, float | None]:
        start = self.arrival_s

        def rel(t: float | None) -> float | None:
            return None if t is None else t - start

        return {
            "queue_s": rel(self.admitted_s),
            "encode_done_s": rel(self.encoded_s),
            "first_step_s": rel(self.first_step_s),
            "denoise_done_s": rel(self.denoised_s),
            "latency_s": rel(self.finished_s),
        }


@dataclass(eq=False)
class Request:
    """The engine's record of one generation."""

    request_id: int
    prompt: str
    negative_prompt: str
    params: GenerationParams
    arrival_s: float
    num_patches: int
    """Patches of one branch of this request's latent."""
    slo_ms: float | None = None
    deadline_s: float | None = None
    """Absolute deadline on the engine clock; set by the scheduler when the request is added."""
    status: RequestStatus = RequestStatus.WAITING
    step_index: int = 0
    """Denoising steps completed so far."""
    timings: RequestTimings = field(init=False)
    error: str | None = None
    """Why the request was dropped or failed."""
    state: dict[str, Any] = field(default_factory=dict, repr=False)
    """Engine-owned per-request tensors (conditioning, noise); freed when the request ends."""

    def __post_init__(self) -> None:
        self.timings = RequestTimings(arrival_s=self.arrival_s)

    @property
    def num_entries(self) -> int:
        """Latents this request puts in the patch batch: 2 with classifier-free guidance, else 1."""
        return 2 if self.params.do_cfg else 1

    @property
    def steps_left(self) -> int:
        return self.params.steps - self.step_index

    @property
    def resolution(self) -> tuple[int, int]:
        """(width, height) in pixels."""
        return self.params.width, self.params.height
