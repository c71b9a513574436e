"""What a caller gets back for one request, and the hooks observers (metrics) receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import PIL.Image

from patchedserve.models import GenerationParams
from patchedserve.request import Request, RequestStatus


@dataclass
class GenerationResult:
    """The outcome of one request."""

    request_id: int
    status: RequestStatus
    """FINISHED, DROPPED, CANCELLED or FAILED."""
    image: PIL.Image.Image | None
    """The image when FINISHED, else None."""
    params: GenerationParams
    """Parameters used, defaults filled in."""
    timings: dict[str, float | None]
    """Seconds from arrival until each stage: queue_s (admitted to the batch), encode_done_s (prompt
    encoded), first_step_s (first denoising step began), denoise_done_s, latency_s (image ready);
    None for a stage it did not reach."""
    error: str | None = None
    """Why the request did not finish."""
    deadline_met: bool | None = None
    """Whether it finished before its deadline (None without a deadline)."""

    @property
    def ok(self) -> bool:
        return self.status == RequestStatus.FINISHED

    @classmethod
    def of(cls, r: Request, image: PIL.Image.Image | None = None) -> GenerationResult:
        met = None
        if r.deadline_s is not None:
            met = r.status == RequestStatus.FINISHED and (r.timings.finished_s or 0.0) <= r.deadline_s
        return cls(r.request_id, r.status, image, r.params, r.timings.as_dict(), r.error, met)


class EngineObserver(Protocol):
    """Receives engine events (the server's Prometheus metrics implement this)."""

    def on_step(self, latency_s: float, num_patches: int, num_running: int, num_waiting: int) -> None: ...

    def on_result(self, result: GenerationResult) -> None: ...
