"""Samplers: turn the denoiser's output into the next latents, for a batch of requests at mixed steps.

Owns the registry of sampler names. The engine calls ``get_sampler`` once per model and sampler name,
``plan`` once per step count, and ``scale_model_input``/``step`` once per batched denoising step;
tests and benchmarks call ``make_diffusers_scheduler`` to build the diffusers oracle of a sampler.
"""

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from patchedserve.sampler.base import Sampler, SamplerPlan, check_sampler_name
from patchedserve.sampler.ddim import DDIMSampler
from patchedserve.sampler.dpmpp import DPMPP2MSampler
from patchedserve.sampler.euler import EulerSampler
from patchedserve.sampler.flow import FlowEulerSampler

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

_SAMPLERS: dict[str, type[Sampler]] = {
    cls.name: cls for cls in (EulerSampler, DDIMSampler, DPMPP2MSampler, FlowEulerSampler)
}
SAMPLER_NAMES: tuple[str, ...] = ("euler", "ddim", "dpmpp_2m", "flow_euler")


def get_sampler(name: str, scheduler_config: Mapping[str, Any]) -> Sampler:
    """The sampler ``name`` configured by a model's diffusers scheduler config (e.g. ``dict(sched.config)``).

    Raises ``InvalidRequestError`` (field "sampler") for an unknown name or a config option the
    sampler does not implement, and the diffusers error for a config diffusers itself rejects.
    """
    check_sampler_name(name, SAMPLER_NAMES)
    return _SAMPLERS[name](scheduler_config)


def make_diffusers_scheduler(name: str, scheduler_config: Mapping[str, Any]) -> "SchedulerMixin":
    """A fresh diffusers scheduler that ``get_sampler(name, scheduler_config)`` reproduces step for step."""
    check_sampler_name(name, SAMPLER_NAMES)
    return _SAMPLERS[name].make_diffusers_scheduler(scheduler_config)


__all__ = [
    "SAMPLER_NAMES",
    "Sampler",
    "SamplerPlan",
    "get_sampler",
    "make_diffusers_scheduler",
]
