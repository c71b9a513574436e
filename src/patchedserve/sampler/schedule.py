"""Training noise schedules and config checks shared by the discrete-time samplers.

Owns the maths that turns a diffusers scheduler config into the 1000-entry training tables
(``alphas_cumprod``, VE sigmas) and the refusal of config options the samplers do not implement.
Called by ``euler.py``, ``ddim.py`` and ``dpmpp.py`` when they build a plan; nothing here runs per step.

The tables are built in float32 with torch, exactly as diffusers builds them, because every later
number (interpolated sigmas, alpha products) inherits their rounding: matching diffusers to float32
precision starts here.
"""

import math
from collections.abc import Callable, Container, Mapping
from typing import Any

import numpy as np
import torch

from patchedserve.errors import InvalidRequestError


def refuse_unless(
    sampler: str, config: Mapping[str, Any], key: str, allowed: Container[Any], why: str = ""
) -> None:
    """Raise a clear error when ``config[key]`` (if present) is a value this sampler does not implement."""
    if key in config and config[key] not in allowed:
        hint = f" ({why})" if why else ""
        raise InvalidRequestError(
            f"sampler {sampler!r} does not support scheduler config {key}={config[key]!r}{hint}",
            field="sampler",
        )


def refuse_common(sampler: str, config: Mapping[str, Any]) -> None:
    """Refuse the noise-schedule options no discrete-time sampler here implements."""
    for key in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "rescale_betas_zero_snr"):
        refuse_unless(sampler, config, key, (False, None))
    refuse_unless(sampler, config, "thresholding", (False, None))
    refuse_unless(sampler, config, "prediction_type", ("epsilon", "v_prediction"))


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> list[float]:
    """Betas of the 'squaredcos_cap_v2' (improved DDPM cosine) schedule, in float64."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    n = num_train_timesteps
    return [min(1.0 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]


def train_alphas_cumprod(sampler: str, config: Mapping[str, Any]) -> torch.Tensor:
    """Cumulative product of (1 - beta) over the training timesteps. Returns [num_train_timesteps] float32."""
    n = int(config["num_train_timesteps"])
    schedule = config.get("beta_schedule", "linear")
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(config["beta_start"], config["beta_end"], n, dtype=torch.float32)
    elif schedule == "scaled_linear":
        start, end = config["beta_start"] ** 0.5, config["beta_end"] ** 0.5
        betas = torch.linspace(start, end, n, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":
        betas = torch.tensor(_cosine_betas(n), dtype=torch.float32)
    else:
        raise InvalidRequestError(
            f"sampler {sampler!r} does not support beta_schedule={schedule!r}"
            " (allowed: linear, scaled_linear, squaredcos_cap_v2, trained_betas)",
            field="sampler",
        )
    return torch.cumprod(1.0 - betas, dim=0)


def train_sigmas(alphas_cumprod: torch.Tensor) -> np.ndarray:
    """VE noise levels sqrt((1 - a) / a) of the training timesteps (float32 maths). [T] -> [T] float64."""
    return (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).numpy().astype(np.float64)


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> np.ndarray:
    """'trailing' spacing: steps end at the last training timestep. Returns [num_steps] float64 integers."""
    ratio = num_train_timesteps / num_steps
    return np.arange(num_train_timesteps, 0, -ratio).round() - 1


def leading_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int) -> np.ndarray:
    """'leading' spacing: integer multiples of T // n, descending, plus the offset. [num_steps] float64."""
    ratio = num_train_timesteps // num_steps
    return (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset


def check_num_steps(num_steps: int, num_train_timesteps: int) -> None:
    """Refuse step counts that no discrete schedule can produce."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise InvalidRequestError(
            f"num_steps must be between 1 and {num_train_timesteps}, got {num_steps}", field="num_steps"
        )


def checked_timesteps(
    num_steps: int, config: Mapping[str, Any], timesteps: Callable[[int], np.ndarray]
) -> np.ndarray:  # [num_steps]
    """``timesteps(num_steps)`` after refusing step counts the schedule cannot give exactly."""
    check_num_steps(num_steps, int(config["num_train_timesteps"]))
    spaced = timesteps(num_steps)
    if len(spaced) != num_steps:
        raise InvalidRequestError(
            f"{config['timestep_spacing']} spacing gives {len(spaced)} timesteps for "
            f"num_steps={num_steps} in diffusers; choose another step count",
            field="num_steps",
        )
    return spaced
