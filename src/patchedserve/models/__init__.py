"""Models: loading a text-to-image model into a `ModelBundle` and the calls every path makes on it.

Owns the built-in tiny models, local diffusers folders, prompt encoding, the denoiser call, latent
decoding and request validation. Used by `reference/`, the CLI, and the patched engine.

Modules: `bundle` (ModelBundle), `builtin` (tiny models), `tokenizer` (local CLIP tokenizer),
`loading` (load_model), `text` (encode_prompts), `denoiser` (denoiser_forward), `vae`
(decode_latents), `validation` (validate_generation). The names load on first use
(`patchedserve._lazy`), so the CLI's parser does without torch.
"""

from typing import TYPE_CHECKING

from patchedserve._lazy import lazy_exports

if TYPE_CHECKING:
    from patchedserve.models.builtin import BUILTIN_MODELS as BUILTIN_MODELS
    from patchedserve.models.builtin import BuiltinModel as BuiltinModel
    from patchedserve.models.bundle import FAMILIES as FAMILIES
    from patchedserve.models.bundle import Family as Family
    from patchedserve.models.bundle import GenerationDefaults as GenerationDefaults
    from patchedserve.models.bundle import ModelBundle as ModelBundle
    from patchedserve.models.denoiser import denoiser_forward as denoiser_forward
    from patchedserve.models.loading import load_model as load_model
    from patchedserve.models.names import DEFAULT_MODEL as DEFAULT_MODEL
    from patchedserve.models.text import Conditioning as Conditioning
    from patchedserve.models.text import encode_prompts as encode_prompts
    from patchedserve.models.text import sdxl_time_ids as sdxl_time_ids
    from patchedserve.models.text import stack_conditioning as stack_conditioning
    from patchedserve.models.vae import decode_latents as decode_latents
    from patchedserve.models.validation import MAX_GUIDANCE_SCALE as MAX_GUIDANCE_SCALE
    from patchedserve.models.validation import MAX_STEPS as MAX_STEPS
    from patchedserve.models.validation import SAMPLERS_BY_FAMILY as SAMPLERS_BY_FAMILY
    from patchedserve.models.validation import GenerationParams as GenerationParams
    from patchedserve.models.validation import validate_generation as validate_generation

_MODULES = {
    "BUILTIN_MODELS": "builtin",
    "DEFAULT_MODEL": "names",
    "BuiltinModel": "builtin",
    "FAMILIES": "bundle",
    "Family": "bundle",
    "GenerationDefaults": "bundle",
    "ModelBundle": "bundle",
    "denoiser_forward": "denoiser",
    "load_model": "loading",
    "Conditioning": "text",
    "encode_prompts": "text",
    "sdxl_time_ids": "text",
    "stack_conditioning": "text",
    "decode_latents": "vae",
    "MAX_GUIDANCE_SCALE": "validation",
    "MAX_STEPS": "validation",
    "SAMPLERS_BY_FAMILY": "validation",
    "GenerationParams": "validation",
    "validate_generation": "validation",
}
__all__ = sorted(_MODULES)
__getattr__ = lazy_exports(__name__, _MODULES)
