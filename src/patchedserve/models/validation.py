"""`validate_generation`: the one place that checks a request's size, steps, guidance, sampler and seed.

Called by the reference pipeline, the CLI, and (later) the engine and the HTTP server, so every entry
point rejects the same inputs with the same message. Each error names the field, what was given and
what is allowed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from patchedserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from patchedserve.models.bundle import Family, ModelBundle

MAX_STEPS = 500
"""Most denoising steps a request may ask for."""
MAX_GUIDANCE_SCALE = 50.0
"""Largest classifier-free guidance scale a request may ask for."""
MAX_SEED = 2**63 - 1
"""Largest seed; torch generators take 64-bit seeds."""
MAX_PROMPT_CHARS = 32_000
"""Longest prompt (and negative prompt) accepted, in characters, as the OpenAI API's longest. The
text encoders read the first 77 tokens only; tokenizing a longer text costs the engine's loop time
that every running request waits for."""

SAMPLERS_BY_FAMILY: dict[Family, tuple[str, ...]] = {
    "sd15": ("euler", "ddim", "dpmpp_2m"),
    "sd2": ("euler", "ddim", "dpmpp_2m"),
    "sdxl": ("euler", "ddim", "dpmpp_2m"),
    "sd3": ("flow_euler",),
}
"""Samplers that fit each family: noise-prediction models vs the flow-matching SD3."""


@dataclass(frozen=True)
class GenerationParams:
    """A request's generation parameters after defaults are filled in and every range is checked."""

    width: int
    """Image width in pixels, a multiple of the model's size unit."""
    height: int
    """Image height in pixels, a multiple of the model's size unit."""
    steps: int
    """Number of denoising steps, 1..MAX_STEPS."""
    guidance_scale: float
    """Classifier-free guidance scale, 0..MAX_GUIDANCE_SCALE; <= 1 means no unconditional pass."""
    sampler: str
    """Sampler name, one of SAMPLERS_BY_FAMILY[family]."""
    seed: int
    """Seed of the initial noise, 0..MAX_SEED."""

    @property
    def do_cfg(self) -> bool:
        """Whether the request runs the unconditional branch (diffusers: guidance_scale > 1)."""
        return self.guidance_scale > 1.0


def validate_generation(
    bundle: ModelBundle,
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    sampler: str | None = None,
    seed: int = 0,
) -> GenerationParams:
    """Fills in the bundle's defaults for None and checks every value.

    Raises:
        InvalidRequestError: with ``field`` set to the offending parameter.
    """
    d = bundle.defaults
    params = GenerationParams(
        width=_check_side(bundle, "width", d.width if width is None else width),
        height=_check_side(bundle, "height", d.height if height is None else height),
        steps=_check_int("steps", d.steps if steps is None else steps, 1, MAX_STEPS),
        guidance_scale=_check_guidance(d.guidance_scale if guidance_scale is None else guidance_scale),
        sampler=_check_sampler(bundle, bundle.default_sampler if sampler is None else sampler),
        seed=_check_int("seed", seed, 0, MAX_SEED),
    )
    return params


def _check_int(field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{field} must be an integer from {low} to {high}; got {value!r}", field)
    if not low <= value <= high:
        raise InvalidRequestError(f"{field} must be from {low} to {high}; got {value}", field)
    return value


def _check_side(bundle: ModelBundle, field: str, value: object) -> int:
    unit, top = bundle.size_unit, bundle.max_size // bundle.size_unit * bundle.size_unit
    allowed = f"a multiple of {unit} pixels from {unit} to {top} for {bundle.name}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequestError(f"{field} must be an integer, {allowed}; got {value!r}", field)
    if value <= 0 or value > top or value % unit:
        raise InvalidRequestError(f"{field} must be {allowed}; got {value}", field)
    return value


def _check_guidance(value: object) -> float:
    allowed = f"from 0 to {MAX_GUIDANCE_SCALE:g}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRequestError(
            f"guidance_scale must be a number {allowed}; got {value!r}", "guidance_scale"
        )
    if not 0.0 <= value <= MAX_GUIDANCE_SCALE:  # also rejects NaN
        raise InvalidRequestError(f"guidance_scale must be {allowed}; got {value}", "guidance_scale")
    return float(value)


def _check_sampler(bundle: ModelBundle, value: object) -> str:
    allowed = SAMPLERS_BY_FAMILY[bundle.family]
    if value not in allowed:
        raise InvalidRequestError(
            f"sampler must be one of {', '.join(allowed)} for {bundle.name}; got {value!r}", "sampler"
        )
    return str(value)


def check_prompts(prompt: object, negative_prompt: object) -> None:
    """A request's texts: strings of at most ``MAX_PROMPT_CHARS`` characters (the prompt may be
    empty, as diffusers allows: unconditional generation).

    Raises:
        InvalidRequestError: with ``field`` ``prompt`` or ``negative_prompt``.
    """
    for field, text in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if not isinstance(text, str):
            raise InvalidRequestError(f"{field} must be a string; got {type(text).__name__}", field=field)
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(
                f"{field} has {len(text)} characters; at most {MAX_PROMPT_CHARS} are accepted", field=field
            )


def check_slo_ms(slo_ms: object) -> None:
    """A request's latency objective: None, or a positive finite number of milliseconds.

    Raises:
        InvalidRequestError: with ``field`` ``slo_ms``.
    """
    if slo_ms is None:
        return
    if isinstance(slo_ms, bool) or not isinstance(slo_ms, (int, float)):
        raise InvalidRequestError(f"slo_ms must be a number of milliseconds; got {slo_ms!r}", field="slo_ms")
    if not 0 < slo_ms < math.inf:
        raise InvalidRequestError(f"slo_ms must be positive and finite; got {slo_ms}", field="slo_ms")
