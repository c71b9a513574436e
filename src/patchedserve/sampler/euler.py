"""Euler sampler: batched, stateless equivalent of diffusers' ``EulerDiscreteScheduler`` (no churn).

Owns the Euler plan (VE sigmas interpolated at the spaced timesteps) and its update. Built by
``get_sampler("euler", ...)``; the engine's denoising loop calls ``scale_model_input`` and ``step``.

With sigma_hat = sigma (no churn) the Euler step x + (sigma_next - sigma) * (x - x0) / sigma is
linear in the sample and the model output, so each step is two per-row coefficients.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from patchedserve.errors import InvalidRequestError
from patchedserve.sampler.base import LinearStepSampler, SamplerPlan
from patchedserve.sampler.schedule import (
    checked_timesteps,
    leading_timesteps,
    refuse_common,
    refuse_unless,
    trailing_timesteps,
    train_alphas_cumprod,
    train_sigmas,
)


class EulerSampler(LinearStepSampler):
    """Euler method on the VE ODE dx/dsigma = (x - x0) / sigma; model input scaled by 1/sqrt(sigma^2+1)."""

    name = "euler"
    order = 1
    COEFFS = ("in_scale", "c_sample", "c_model")
    diffusers_class = "EulerDiscreteScheduler"

    def _check_config(self, config: Mapping[str, Any]) -> None:
        refuse_common(self.name, config)
        refuse_unless(self.name, config, "interpolation_type", ("linear",))
        refuse_unless(self.name, config, "final_sigmas_type", ("zero", "sigma_min"))
        refuse_unless(self.name, config, "timestep_spacing", ("linspace", "leading", "trailing"))
        if config.get("timestep_type") == "continuous" and config["prediction_type"] == "v_prediction":
            raise InvalidRequestError(
                "sampler 'euler' does not support timestep_type='continuous' with v_prediction",
                field="sampler",
            )

    def _timesteps(self, num_steps: int) -> np.ndarray:  # [num_steps] float32
        cfg = self.config
        train_steps = int(cfg["num_train_timesteps"])
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            return np.linspace(0, train_steps - 1, num_steps, dtype=np.float32)[::-1].copy()
        if spacing == "leading":
            return leading_timesteps(train_steps, num_steps, int(cfg["steps_offset"])).astype(np.float32)
        return trailing_timesteps(train_steps, num_steps).astype(np.float32)

    def _sigmas(self, timesteps: np.ndarray) -> torch.Tensor:  # [n] -> [n + 1] float32
        alphas_cumprod = train_alphas_cumprod(self.name, self.config)  # [T] float32
        table = train_sigmas(alphas_cumprod)  # [T] float64
        sigmas = np.interp(timesteps, np.arange(len(table)), table)
        last = 0.0
        if self.config["final_sigmas_type"] == "sigma_min":
            last = float(((1 - alphas_cumprod[0]) / alphas_cumprod[0]) ** 0.5)
        return torch.from_numpy(np.concatenate([sigmas, [last]]).astype(np.float32))

    def _build_plan(self, num_steps: int) -> SamplerPlan:
        timesteps = checked_timesteps(num_steps, self.config, self._timesteps)
        sigmas32 = self._sigmas(timesteps)  # [n + 1] float32
        # diffusers computes this in float32 on the sigma table; do the same so the value is identical.
        max_sigma = sigmas32.max()
        if self.config["timestep_spacing"] == "leading":
            max_sigma = (max_sigma**2 + 1) ** 0.5

        sigmas = sigmas32.double()
        sigma, dt = sigmas[:-1], sigmas[1:] - sigmas[:-1]  # [n], [n]
        in_scale = (sigma**2 + 1) ** 0.5
        if self.config["prediction_type"] == "epsilon":
            c_sample, c_model = torch.ones_like(sigma), dt
        else:  # v_prediction: x0 = x / (sigma^2 + 1) - v * sigma / sqrt(sigma^2 + 1)
            c_sample, c_model = 1 + dt * sigma / (sigma**2 + 1), dt / in_scale
        return SamplerPlan(
            sampler=self.name,
            num_steps=num_steps,
            timesteps=torch.from_numpy(timesteps),
            coeffs=torch.stack([in_scale, c_sample, c_model], dim=1),
            init_noise_sigma=float(max_sigma),
        )

    def scale_model_input(
        self,
        sample: torch.Tensor,  # [B, ...]
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> torch.Tensor:  # [B, ...]
        c = self._row_coeffs(sample, plans, step_index, row_request)
        return (sample.to(c["in_scale"].dtype) / c["in_scale"]).to(sample.dtype)
