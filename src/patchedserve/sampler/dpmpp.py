"""DPM-Solver++ 2M sampler: batched, stateless equivalent of diffusers' ``DPMSolverMultistepScheduler``
with algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint", lower_order_final=True and
final_sigmas_type="zero".

Owns the DPM++ 2M plan and its update. Built by ``get_sampler("dpmpp_2m", ...)``; the engine's
denoising loop calls ``step`` and keeps the returned history (the data prediction x0 of each row)
to pass back at the row's next step.

In log-SNR time lambda = -log(sigma), with h = lambda_next - lambda and b = alpha_next * (1 - e^-h):
    first order:  x_next = (sigma_t_next / sigma_t) * x + b * x0
    second order: x_next = (sigma_t_next / sigma_t) * x + b * x0 + 0.5 * b * (h / h_prev) * (x0 - x0_prev)
where sigma_t = sigma * alpha is the VP noise scale. diffusers takes the first-order step at step 0
(no history yet) and at the last step (final sigma 0, so x_next = x0).
"""

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from patchedserve.sampler.base import Sampler, SamplerPlan, compute_dtype
from patchedserve.sampler.schedule import (
    checked_timesteps,
    refuse_common,
    refuse_unless,
    trailing_timesteps,
    train_alphas_cumprod,
    train_sigmas,
)


def _second_order(step_index: int, num_steps: int) -> bool:
    """Whether a step uses the history: all but the first (no history yet) and the last (final sigma
    0 makes diffusers fall back to first order, whose result is x0 itself)."""
    return 0 < step_index < num_steps - 1


class DPMPP2MSampler(Sampler):
    """Second-order multistep DPM-Solver++ on the data prediction; history is the previous x0."""

    name = "dpmpp_2m"
    order = 2
    COEFFS = ("x0_sample", "x0_model", "c_sample", "c_x0", "c_diff", "use_history")
    diffusers_class = "DPMSolverMultistepScheduler"
    diffusers_overrides: ClassVar[Mapping[str, Any]] = {
        "algorithm_type": "dpmsolver++",
        "solver_order": 2,
        "solver_type": "midpoint",
        "lower_order_final": True,
        "euler_at_final": False,
        "final_sigmas_type": "zero",
    }

    def _check_config(self, config: Mapping[str, Any]) -> None:
        refuse_common(self.name, config)
        refuse_unless(self.name, config, "timestep_spacing", ("linspace", "leading", "trailing"))
        refuse_unless(self.name, config, "use_lu_lambdas", (False,))
        refuse_unless(self.name, config, "use_flow_sigmas", (False,))
        refuse_unless(self.name, config, "use_dynamic_shifting", (False,))
        refuse_unless(self.name, config, "variance_type", (None,))
        refuse_unless(self.name, config, "lambda_min_clipped", (-float("inf"),))

    def _timesteps(self, num_steps: int) -> np.ndarray:  # [num_steps] int64
        # DPM spaces n + 1 points and drops the last, unlike Euler and DDIM.
        cfg = self.config
        train_steps = int(cfg["num_train_timesteps"])
        spacing = cfg["timestep_spacing"]
        spaced: np.ndarray
        if spacing == "linspace":
            spaced = np.linspace(0, train_steps - 1, num_steps + 1).round()[::-1][:-1]
        elif spacing == "leading":
            ratio = train_steps // (num_steps + 1)
            spaced = (np.arange(0, num_steps + 1) * ratio).round()[::-1][:-1] + int(cfg["steps_offset"])
        else:
            spaced = trailing_timesteps(train_steps, num_steps)
        return spaced.astype(np.int64)

    def _build_plan(self, num_steps: int) -> SamplerPlan:
        timesteps = checked_timesteps(num_steps, self.config, self._timesteps)
        table = train_sigmas(train_alphas_cumprod(self.name, self.config))  # [T] float64
        sigmas32 = np.concatenate([np.interp(timesteps, np.arange(len(table)), table), [0.0]])
        sigmas = torch.from_numpy(sigmas32.astype(np.float32)).double()  # [n + 1], float32 values
        return SamplerPlan(
            sampler=self.name,
            num_steps=num_steps,
            timesteps=torch.from_numpy(timesteps).to(torch.float32),
            coeffs=self._coeffs(sigmas),
            init_noise_sigma=1.0,
        )

    def _coeffs(self, sigmas: torch.Tensor) -> torch.Tensor:  # [n + 1] -> [n, 6] float64
        n = sigmas.shape[0] - 1
        alpha = 1 / (sigmas**2 + 1) ** 0.5  # [n + 1] VP signal scale
        sigma_t = sigmas * alpha  # [n + 1] VP noise scale
        lam = -torch.log(sigmas[:-1])  # [n]; the final sigma is 0 (lambda = inf), handled apart
        if self.config["prediction_type"] == "epsilon":  # x0 = (x - sigma_t * eps) / alpha
            x0_sample, x0_model = 1 / alpha[:-1], -sigmas[:-1]
        else:  # v_prediction: x0 = alpha * x - sigma_t * v
            x0_sample, x0_model = alpha[:-1], -sigma_t[:-1]
        c_sample = sigma_t[1:] / sigma_t[:-1]  # = e^-h * alpha_next / alpha
        c_x0 = alpha[1:] * (1 - sigmas[1:] / sigmas[:-1])  # e^-h = sigma_next / sigma
        c_diff = torch.zeros(n, dtype=torch.float64)
        use_history = torch.zeros(n, dtype=torch.float64)
        for k in range(n):
            if _second_order(k, n):
                h, h_prev = lam[k + 1] - lam[k], lam[k] - lam[k - 1]
                c_diff[k] = 0.5 * c_x0[k] * h / h_prev
                use_history[k] = 1.0
        return torch.stack([x0_sample, x0_model, c_sample, c_x0, c_diff, use_history], dim=1)

    def step(
        self,
        sample: torch.Tensor,  # [B, ...]
        model_output: torch.Tensor,  # [B, ...]
        history: torch.Tensor | None,  # [B, ...] previous x0 per row, or None
        plans: Sequence[SamplerPlan],
        step_index: Sequence[int],
        row_request: torch.Tensor,  # [B] int64
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, ...], [B, ...] x0 in compute_dtype(sample)
        c = self._row_coeffs(sample, plans, step_index, row_request)
        dtype = compute_dtype(sample)
        x = sample.to(dtype)
        x0 = x * c["x0_sample"] + model_output.to(dtype) * c["x0_model"]
        x_next = x * c["c_sample"] + x0 * c["c_x0"]
        if any(_second_order(k, plan.num_steps) for plan, k in zip(plans, step_index, strict=True)):
            if history is None:
                raise ValueError("dpmpp_2m: a request past its first step needs the history of its rows")
            # Select rather than multiply: rows without history may hold zeros or garbage (even NaN).
            prev_x0 = torch.where(c["use_history"] > 0, history.to(dtype), x0)
            x_next = x_next + (x0 - prev_x0) * c["c_diff"]
        return x_next.to(sample.dtype), x0
