"""Models: loading a text-to-image model into a `ModelBundle` and the calls every path makes on it.

Owns the built-in tiny models, local diffusers folders, prompt encoding, the denoiser call, latent
decoding and request validation. Used by `reference/`, the CLI, and the patched engine.

Modules: `bundle` (ModelBundle), `builtin` (tiny models), `tokenizer` (local CLIP tokenizer),
`loading` (load_model), `text` (encode_prompts), `denoiser` (denoiser_forward), `vae`
(decode_latents), `validation` (validate_generation).
"""

from patchedserve.models.builtin import BUILTIN_MODELS, DEFAULT_MODEL, BuiltinModel
from patchedserve.models.bundle import FAMILIES, Family, GenerationDefaults, ModelBundle
from patchedserve.models.denoiser import denoiser_forward
from patchedserve.models.loading import load_model
from patchedserve.models.text import Conditioning, encode_prompts, sdxl_time_ids, stack_conditioning
from patchedserve.models.vae import decode_latents
from patchedserve.models.validation import (
    MAX_GUIDANCE_SCALE,
    MAX_STEPS,
    SAMPLERS_BY_FAMILY,
    GenerationParams,
    validate_generation,
)

__all__ = [
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "FAMILIES",
    "MAX_GUIDANCE_SCALE",
    "MAX_STEPS",
    "SAMPLERS_BY_FAMILY",
    "BuiltinModel",
    "Conditioning",
    "Family",
    "GenerationDefaults",
    "GenerationParams",
    "ModelBundle",
    "decode_latents",
    "denoiser_forward",
    "encode_prompts",
    "load_model",
    "sdxl_time_ids",
    "stack_conditioning",
    "validate_generation",
]
