"""Engine configuration: one frozen dataclass, checked on construction.

Torch loads when a config is checked (its device), not when this module is imported, so the CLI's
parser can show the defaults without it."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from patchedserve.errors import InvalidRequestError
from patchedserve.patch.config import PatchCacheConfig
from patchedserve.scheduler.config import RES_FCFS, SchedulerConfig

if TYPE_CHECKING:
    import torch

DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
"""Denoiser dtypes an engine runs in (torch's names)."""


@dataclass(frozen=True)
class EngineConfig:
    """How an engine batches, schedules and where it runs."""

    patch_size: int = 256
    """Patch side in image pixels; every image side must be a multiple of it."""
    policy: str = "fcfs"
    """Scheduling policy: ``fcfs`` or ``slo``."""
    max_running: int = 12
    """Most requests denoised together in one step."""
    max_waiting: int = 256
    """Most queued requests; beyond it new requests are refused (HTTP 429)."""
    slo_scale: float = 5.0
    """Deadline = arrival + slo_scale x standalone latency when a request gives no ``slo_ms``."""
    on_infeasible: str = "drop"
    """``slo`` policy: ``drop`` requests that cannot make their deadline, or keep them ``best-effort``."""
    admission: str = "throughput"
    """``slo`` policy: ``throughput`` or ``least-slack`` (the paper's rule); see ``scheduler.slo``."""
    reserve: bool = True
    """``slo`` policy: keep room in every step for the tightest recent request class
    (``SchedulerConfig.reserve``)."""
    pause: bool = True
    """``slo`` policy: let requests with time to spare sit a step out for urgent ones
    (``SchedulerConfig.pause``)."""
    inline_decode: float = 2.0
    """``slo`` policy: decode in the denoising loop a request left with less than this many decode
    times to its deadline (``SchedulerConfig.inline_decode``; 0: always on the worker)."""
    device: str = "cpu"
    """Torch device of the denoiser (``cpu``, ``cuda``, ``cuda:1``)."""
    dtype: str = "float32"
    """Denoiser dtype: float32, float16 or bfloat16."""
    max_patches_per_call: int | None = None
    """Run the patched step in chunks of whole images of at most this many patches (None: one call).
    On CPUs, smaller working sets can be faster; measure with ``patchedserve bench step``."""
    execution: str = "patched"
    """``patched``: one patched model call over all requests; ``image``: the model's own forward per
    resolution (the image-level baselines)."""
    patch_cache: PatchCacheConfig | None = None
    """Patch-level block cache (approximate): reuse a block's output per patch where its input
    barely changed since the last step. None: exact output."""
    approx_cache: bool = False
    """NIRVANA-style reuse of similar prompts' intermediate latents (a baseline; approximate)."""
    approx_cache_similarity: str = "model"
    """How that cache compares prompts: ``model`` (text embeddings) or ``exact`` (repeats only)."""
    profile: str | os.PathLike[str] | None = None
    """Latency profile (``patchedserve profile --out``); without one, ``slo`` profiles briefly at start."""
    streams: int | None = None
    """Parts of each step's batch denoised side by side, each on a share of the torch threads
    (``patchedserve.streams``); None: two on a CPU with at least two threads, else one. Under the
    patch cache each stream has its own cache and an entry always runs on the same stream."""
    decode_in_thread: bool = True
    """Decode finished images on a worker thread so denoising does not wait for the VAE."""

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.max_running < 1 or self.max_waiting < 1:
            raise InvalidRequestError("max_running and max_waiting must be at least 1", field="max_running")
        if self.dtype not in DTYPES:
            raise InvalidRequestError(
                f"dtype must be one of {', '.join(DTYPES)}; got {self.dtype!r}", "dtype"
            )
        if self.execution not in ("patched", "image"):
            raise InvalidRequestError("execution must be patched or image", field="execution")
        if self.patch_cache is not None and (self.execution != "patched" or self.max_patches_per_call):
            raise InvalidRequestError(
                "the patch cache needs patched execution in whole-batch calls", field="patch_cache"
            )
        if self.streams is not None and self.streams < 1:
            raise InvalidRequestError("streams must be at least 1", field="streams")
        if self.approx_cache_similarity not in ("model", "exact"):
            raise InvalidRequestError("approx_cache_similarity must be model or exact", field="approx_cache")
        self.scheduler_config()  # checks the policy's knobs
        check_device(self.device)

    def scheduler_config(self) -> SchedulerConfig:
        """The scheduling policy's knobs (``res-fcfs`` runs on FCFS's)."""
        return SchedulerConfig(
            policy="fcfs" if self.policy == RES_FCFS else self.policy,
            max_running=self.max_running,
            slo_scale=self.slo_scale,
            on_infeasible=self.on_infeasible,
            admission=self.admission,
            reserve=self.reserve,
            pause=self.pause,
            inline_decode=self.inline_decode,
        )

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        dtype: torch.dtype = getattr(torch, self.dtype)
        return dtype


def check_device(name: str) -> None:
    """Refuse a device torch cannot parse or this machine does not have, naming what is wrong."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InvalidRequestError(
            f"device {name!r} is not a torch device (cpu, cuda, cuda:1): {err}", "device"
        ) from err
    if device.type == "cuda":
        count = torch.cuda.device_count()  # 0 on a CPU-only build or a machine without a GPU
        if (device.index or 0) >= count:
            raise InvalidRequestError(
                f"device {name!r} is not available here ({count} CUDA devices)", "device"
            )
    elif device.type != "cpu":
        raise InvalidRequestError(f"device {name!r}: only cpu and cuda are supported", "device")


_PLAIN_TYPES: dict[str, tuple[tuple[type, ...], str]] = {
    "int": ((int,), "an integer"),
    "float": ((int, float), "a number"),
    "str": ((str,), "a string"),
    "str | os.PathLike[str]": ((str, os.PathLike), "a path"),
    "bool": ((bool,), "True or False"),
    "PatchCacheConfig": ((PatchCacheConfig,), "a PatchCacheConfig"),
}


def check_field_types(config: object) -> None:
    """Refuse a field of the wrong type (``max_running="4"``) with a named error, before a
    comparison deep inside fails with a ``TypeError``. Reads the dataclass's own annotations."""
    for field in fields(config):  # type: ignore[arg-type]
        annotation = str(field.type)
        optional = annotation.endswith(" | None")
        known = _PLAIN_TYPES.get(annotation.removesuffix(" | None"))
        value = getattr(config, field.name)
        if known is None or (optional and value is None):
            continue
        allowed, kind = known
        if (isinstance(value, bool) and bool not in allowed) or not isinstance(value, allowed):
            kind += " or None" if optional else ""
            raise InvalidRequestError(f"{field.name} must be {kind}; got {value!r}", field=field.name)
