"""Flow-matching Euler sampler: batched, stateless equivalent of diffusers'
``FlowMatchEulerDiscreteScheduler`` with a static shift (SD3), no dynamic shifting.

Owns the flow plan (shifted sigmas in [0, 1], timesteps = sigma * num_train_timesteps) and its
update x_next = x + (sigma_next - sigma) * v. Built by ``get_sampler("flow_euler", ...)``; the
engine's denoising loop calls ``step``.
"""

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from patchedserve.sampler.base import Sampler, SamplerPlan, compute_dtype
from patchedserve.sampler.schedule import check_num_steps, refuse_common, refuse_unless


def _shift(sigmas: Any, shift: float) -> Any:
    """SD3's time shift sigma' = s * sigma / (1 + (s - 1) * sigma), on a tensor or an array."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowEulerSampler(Sampler):
    """Euler method on the rectified-flow ODE dx/dsigma = v, with a resolution-independent shift."""

    name = "flow_euler"
    order = 1
    COEFFS = ("c_model",)
    diffusers_class = "FlowMatchEulerDiscreteScheduler"

    def _check_config(self, config: Mapping[str, Any]) -> None:
        refuse_common(self.name, config)
        refuse_unless(
            self.name,
            config,
            "use_dynamic_shifting",
            (False,),
            "the shift would depend on each request's resolution",
        )
        refuse_unless(self.name, config, "shift_terminal", (None,))
        refuse_unless(self.name, config, "invert_sigmas", (False,))
        refuse_unless(self.name, config, "stochastic_sampling", (False,))

    def _sigmas(self, num_steps: int) -> torch.Tensor:  # [num_steps] float32
        train_steps = int(self.config["num_train_timesteps"])
        shift = float(self.config["shift"])
        # The training table is built (and shifted) in float32; only its two ends are used, and
        # diffusers shifts again after spacing between them. Both shifts are reproduced on purpose.
        train = torch.from_numpy(np.linspace(1, train_steps, train_steps, dtype=np.float32)[::-1].copy())
        train = _shift(train / train_steps, shift)
        sigma_max, sigma_min = train[0].item(), train[-1].item()
        spaced = np.linspace(sigma_max * train_steps, sigma_min * train_steps, num_steps) / train_steps
        return torch.from_numpy(_shift(spaced, shift)).to(torch.float32)

    def _build_plan(self, num_steps: int) -> SamplerPlan:
        check_num_steps(num_steps, int(self.config["num_train_timesteps"]))
        sigmas32 = self._sigmas(num_steps)
        timesteps = sigmas32 * int(self.config["num_train_timesteps"])  # float32 product, as diffusers
        sigmas = torch.cat([sigmas32, torch.zeros(1)]).double()  # [n + 1], float32 values
        return SamplerPlan(
            sampler=self.name,
            num_steps=num_steps,
            timesteps=timesteps,
            # Difference of two float32 numbers in float64, rounded once: the float32 subtraction.
            coeffs=(sigmas[1:] - sigmas[:-1]).unsqueeze(1),
            init_noise_sigma=1.0,
        )

    def step(
        self,
        sample: torch.Tensor,  # [B, ...]
        model_output: torch.Tensor,  # [B, ...] velocity
        history: torch.Tensor | None,  # ignored
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> tuple[torch.Tensor, None]:  # [B, ...], None
        c = self._row_coeffs(sample, plans, step_index, row_request)
        dtype = compute_dtype(sample)
        x_next = sample.to(dtype) + model_output.to(dtype) * c["c_model"]
        return x_next.to(sample.dtype), None
