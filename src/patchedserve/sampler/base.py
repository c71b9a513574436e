"""The sampler contract: a stateless ``Sampler`` and the per-step-count ``SamplerPlan`` it builds.

Owns the interface every sampler implements and the one gather that turns "request r is at step k of
plan p" into per-row coefficient tensors. The engine's denoising loop calls ``scale_model_input`` and
``step`` once per batch; each concrete sampler (``euler.py``, ``ddim.py``, ``dpmpp.py``, ``flow.py``)
only fills ``SamplerPlan.coeffs`` and writes its elementwise update.

Why plans and not a scheduler object: requests in one batch sit at different step indices of
different step counts, so nothing may live on a shared object. Everything a step needs is a row of a
small float64 table on the plan, gathered per request, stacked, and expanded to rows of the batch.
"""

import importlib
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch

if TYPE_CHECKING:
    from diffusers import SchedulerMixin

from patchedserve.errors import InvalidRequestError


@dataclass(frozen=True, eq=False)
class SamplerPlan:
    """Everything one step count of one sampler needs; built once by ``Sampler.plan`` and shared."""

    sampler: str
    """Name of the sampler that built this plan (one of ``SAMPLER_NAMES``)."""
    num_steps: int
    """Number of denoising steps; valid step indices are 0 .. num_steps - 1."""
    timesteps: torch.Tensor
    """[num_steps] float32: the value passed to the denoiser as timestep at each step."""
    coeffs: torch.Tensor
    """[num_steps, num_coeffs] float64 on CPU: the update coefficients of each step; columns are
    sampler-specific and named by the sampler's ``COEFFS``."""
    init_noise_sigma: float
    """Standard deviation of the initial latent noise (multiply unit Gaussian noise by it)."""

    def __post_init__(self) -> None:
        if self.timesteps.shape != (self.num_steps,):
            raise ValueError(f"timesteps shape {tuple(self.timesteps.shape)} != ({self.num_steps},)")
        if self.coeffs.dim() != 2 or self.coeffs.shape[0] != self.num_steps:
            raise ValueError(f"coeffs shape {tuple(self.coeffs.shape)} is not ({self.num_steps}, K)")


def compute_dtype(sample: torch.Tensor) -> torch.dtype:
    """Dtype of the update arithmetic: at least float32, as diffusers upcasts half samples for a step."""
    return torch.promote_types(sample.dtype, torch.float32)


class Sampler(ABC):
    """A stateless, batched sampler; per-request state is the plan, the step index and the history.

    Subclasses set ``name``, ``order``, ``COEFFS`` and ``diffusers_class``, implement ``_check_config``,
    ``_build_plan`` and ``step``; ``scale_model_input`` defaults to identity.
    """

    name: ClassVar[str]
    order: ClassVar[int] = 1
    """1: ``step`` ignores and returns no history; 2: history is the previous step's data prediction."""
    COEFFS: ClassVar[tuple[str, ...]]
    """Names of the columns of ``SamplerPlan.coeffs``, in order."""
    diffusers_class: ClassVar[str]
    """Name of the diffusers scheduler class this sampler reproduces step for step (diffusers
    loads when a sampler is made, not when this module is imported: the simulator reads ``order``
    without it)."""
    diffusers_overrides: ClassVar[Mapping[str, Any]] = {}
    """Config values forced on top of the model's scheduler config (they define the algorithm)."""

    def __init__(self, scheduler_config: Mapping[str, Any]) -> None:
        # Resolving through diffusers' own from_config gives exactly the defaults and key handling
        # the reference scheduler gets, so sampler and oracle can never read a config differently.
        resolved: Any = self.make_diffusers_scheduler(scheduler_config)
        self.config: Mapping[str, Any] = resolved.config
        self._check_config(self.config)
        self._plans: dict[int, SamplerPlan] = {}

    @classmethod
    def make_diffusers_scheduler(cls, scheduler_config: Mapping[str, Any]) -> "SchedulerMixin":
        """A fresh diffusers scheduler equivalent to this sampler on ``scheduler_config``."""
        scheduler_class = getattr(importlib.import_module("diffusers"), cls.diffusers_class)
        scheduler = scheduler_class.from_config(dict(scheduler_config), **cls.diffusers_overrides)
        return cast("SchedulerMixin", scheduler)

    def plan(self, num_steps: int) -> SamplerPlan:
        """The plan for ``num_steps`` steps; built on first use and cached (plans are immutable)."""
        plan = self._plans.get(num_steps)
        if plan is None:
            plan = self._build_plan(int(num_steps))
            self._plans[num_steps] = plan
        return plan

    def init_noise_sigma(self, plan: SamplerPlan) -> float:
        """Scale of the initial noise, as diffusers' ``scheduler.init_noise_sigma`` after set_timesteps."""
        return plan.init_noise_sigma

    def scale_model_input(
        self,
        sample: torch.Tensor,  # [B, ...]
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> torch.Tensor:  # [B, ...]
        """The denoiser's input for ``sample``; identity unless the sampler preconditions it."""
        return sample

    @abstractmethod
    def step(
        self,
        sample: torch.Tensor,  # [B, ...]
        model_output: torch.Tensor,  # [B, ...], guidance already applied
        history: torch.Tensor | None,  # [B, ...] or None
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> tuple[torch.Tensor, torch.Tensor | None]:  # [B, ...], [B, ...] or None
        """Advance every row by one step of its own request.

        Args:
            sample: current latents; row b belongs to request ``row_request[b]``.
            model_output: the denoiser's (guidance-combined) prediction for ``sample``.
            history: what the previous ``step`` returned for these rows (order-2 samplers); rows of a
                request at step 0 may hold anything, e.g. zeros for a request that just joined.
            plans: one plan per request, built by this sampler.
            step_index: the current step (0 .. num_steps - 1) of each request.
            row_request: the request index (into ``plans``) of each row.

        Returns:
            The latents after the step, and the new history (None for order-1 samplers).
        """

    @abstractmethod
    def _check_config(self, config: Mapping[str, Any]) -> None:
        """Raise ``InvalidRequestError`` for config options this sampler does not implement."""

    @abstractmethod
    def _build_plan(self, num_steps: int) -> SamplerPlan:
        """Compute the timesteps and per-step coefficients for ``num_steps`` steps."""

    def _row_coeffs(
        self,
        sample: torch.Tensor,  # [B, ...]
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> dict[str, torch.Tensor]:  # name -> [B, 1, ..., 1] in compute_dtype(sample)
        """Gather each request's coefficients at its step and broadcast them to its rows.

        The loop is over requests (to pick scalars on the host); rows are handled by one index_select,
        so the cost per step is one small host-to-device copy however many rows there are.
        """
        if len(plans) != len(step_index):
            raise ValueError(f"{len(plans)} plans but {len(step_index)} step indices")
        if row_request.shape != (sample.shape[0],):
            raise ValueError(f"row_request shape {tuple(row_request.shape)} != ({sample.shape[0]},)")
        picked = []
        for plan, k in zip(plans, step_index, strict=True):
            if plan.sampler != self.name:
                raise ValueError(f"plan of sampler {plan.sampler!r} passed to {self.name!r}")
            if not 0 <= k < plan.num_steps:
                raise IndexError(f"step index {k} out of range for a {plan.num_steps}-step plan")
            picked.append(plan.coeffs[k])
        # Cast on the host first: the copy is smaller and some devices have no float64.
        table = torch.stack(picked).to(compute_dtype(sample)).to(sample.device)  # [R, K]
        rows = table.index_select(0, row_request.to(device=sample.device))  # [B, K]
        shape = (sample.shape[0],) + (1,) * (sample.dim() - 1)
        return {name: rows[:, j].reshape(shape) for j, name in enumerate(self.COEFFS)}


def check_sampler_name(name: str, allowed: Sequence[str]) -> None:
    """Refuse an unknown sampler name, naming the allowed ones."""
    if name not in allowed:
        raise InvalidRequestError(
            f"unknown sampler {name!r}; allowed: {', '.join(allowed)}",
            field="sampler",
        )


class LinearStepSampler(Sampler):
    """A single-step sampler whose update is ``c_sample * x + c_model * model_output`` per row.

    Euler and DDIM differ only in how their plans fill ``c_sample`` and ``c_model``.
    """

    def step(
        self,
        sample: torch.Tensor,  # [B, ...]
        model_output: torch.Tensor,  # [B, ...]
        history: torch.Tensor | None,  # ignored
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> tuple[torch.Tensor, None]:  # [B, ...], None
        c = self._row_coeffs(sample, plans, step_index, row_request)
        dtype = compute_dtype(sample)
        x_next = sample.to(dtype) * c["c_sample"] + model_output.to(dtype) * c["c_model"]
        return x_next.to(sample.dtype), None
