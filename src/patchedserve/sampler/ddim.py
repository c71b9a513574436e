"""DDIM sampler (eta = 0): batched, stateless equivalent of diffusers' ``DDIMScheduler``.

Owns the DDIM plan (alpha products at each step and at its "previous" timestep) and its update.
Built by ``get_sampler("ddim", ...)``; the engine's denoising loop calls ``step``.

Deterministic DDIM, x_prev = sqrt(a_prev) * x0 + sqrt(1 - a_prev) * eps, is linear in the sample and
the model output for both epsilon and v prediction, so each step is two per-row coefficients.
"""

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from patchedserve.sampler.base import LinearStepSampler, SamplerPlan
from patchedserve.sampler.schedule import (
    checked_timesteps,
    leading_timesteps,
    refuse_common,
    refuse_unless,
    trailing_timesteps,
    train_alphas_cumprod,
)


class DDIMSampler(LinearStepSampler):
    """Deterministic DDIM; the model input is not scaled and the initial noise has unit variance."""

    name = "ddim"
    order = 1
    COEFFS = ("c_sample", "c_model")
    diffusers_class = "DDIMScheduler"

    def _check_config(self, config: Mapping[str, Any]) -> None:
        refuse_common(self.name, config)
        refuse_unless(self.name, config, "timestep_spacing", ("linspace", "leading", "trailing"))
        refuse_unless(
            self.name,
            config,
            "clip_sample",
            (False,),
            "clipping x0 is not implemented; DDIMScheduler defaults clip_sample to True when the "
            "model's scheduler config does not set it, so add clip_sample=False",
        )

    def _timesteps(self, num_steps: int) -> np.ndarray:  # [num_steps] int64
        cfg = self.config
        train_steps = int(cfg["num_train_timesteps"])
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            spaced = np.linspace(0, train_steps - 1, num_steps).round()[::-1]
        elif spacing == "leading":
            spaced = leading_timesteps(train_steps, num_steps, int(cfg["steps_offset"]))
        else:
            spaced = trailing_timesteps(train_steps, num_steps)
        return spaced.astype(np.int64)

    def _build_plan(self, num_steps: int) -> SamplerPlan:
        train_steps = int(self.config["num_train_timesteps"])
        timesteps = checked_timesteps(num_steps, self.config, self._timesteps)
        alphas_cumprod = train_alphas_cumprod(self.name, self.config).double()  # [T], float32 values
        final = 1.0 if self.config["set_alpha_to_one"] else float(alphas_cumprod[0])
        # diffusers steps to t - T // n, which is not the next timestep for linspace/trailing spacing.
        prev = timesteps - train_steps // num_steps
        a_t = alphas_cumprod[torch.from_numpy(timesteps)]  # [n]
        a_prev = torch.tensor(
            [float(alphas_cumprod[p]) if p >= 0 else final for p in prev], dtype=torch.float64
        )  # [n]
        sa_t, sb_t = a_t.sqrt(), (1 - a_t).sqrt()
        sa_p, sb_p = a_prev.sqrt(), (1 - a_prev).sqrt()
        if self.config["prediction_type"] == "epsilon":
            # x0 = (x - sb_t * eps) / sa_t
            c_sample, c_model = sa_p / sa_t, sb_p - sa_p * sb_t / sa_t
        else:  # v_prediction: x0 = sa_t * x - sb_t * v, eps = sa_t * v + sb_t * x
            c_sample, c_model = sa_p * sa_t + sb_p * sb_t, sb_p * sa_t - sa_p * sb_t
        return SamplerPlan(
            sampler=self.name,
            num_steps=num_steps,
            timesteps=torch.from_numpy(timesteps).to(torch.float32),
            coeffs=torch.stack([c_sample, c_model], dim=1),
            init_noise_sigma=1.0,
        )
