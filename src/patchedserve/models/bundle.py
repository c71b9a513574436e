"""`ModelBundle`: the components of one text-to-image model, and what the rest of the system asks of it.

Built by `models.builtin` (tiny models made in code) and `models.loading` (local diffusers folders).
Everything downstream (prompt encoding, the denoiser call, decoding, request validation, the patched
engine) reads the model through this one object, never through a diffusers pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    SchedulerMixin,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from patchedserve.models.quiet import quiet_hf

Family = Literal["sd15", "sd2", "sdxl", "sd3"]
FAMILIES: tuple[Family, ...] = ("sd15", "sd2", "sdxl", "sd3")

DEFAULT_MAX_SIZE = 2048
"""Largest image side, in pixels, a bundle accepts unless told otherwise."""


@dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets for each parameter it leaves out."""

    width: int
    """Image width in pixels; a multiple of the bundle's `size_unit`."""
    height: int
    """Image height in pixels; a multiple of the bundle's `size_unit`."""
    steps: int
    """Number of denoising steps."""
    guidance_scale: float
    """Classifier-free guidance scale; <= 1 turns guidance off."""


@dataclass(eq=False)
class ModelBundle:
    """One loaded model: denoiser, VAE, text encoders, tokenizers and the facts derived from them.

    A bundle is shared: `load_model` caches it per name, so every caller holds the same modules.
    `to()` therefore moves them for everyone. For a bundle with another `max_size`, use
    `dataclasses.replace(bundle, max_size=...)`, which shares the modules.
    """

    name: str
    """Built-in name (``tiny-sdxl``) or the folder the model was loaded from."""
    family: Family
    """Which diffusers pipeline the model belongs to; decides prompt encoding and the denoiser call."""
    # diffusers/transformers modules are typed Any: their configs are dynamic attributes mypy cannot see.
    denoiser: Any
    """`UNet2DConditionModel` (sd15, sd2, sdxl) or `SD3Transformer2DModel` (sd3), in eval mode."""
    vae: Any
    """`AutoencoderKL` latent decoder, in eval mode."""
    text_encoders: list[Any]
    """CLIP encoders in pipeline order (sd3: CLIP-L, CLIP-G, then T5 when the model has it)."""
    tokenizers: list[Any]
    """One tokenizer per text encoder, same order."""
    scheduler_config: dict[str, Any]
    """The model's diffusers scheduler config, including ``_class_name``."""
    default_sampler: str
    """Sampler used when a request names none: euler, ddim, dpmpp_2m or flow_euler."""
    defaults: GenerationDefaults
    """Per-parameter defaults of a request."""
    max_size: int = DEFAULT_MAX_SIZE
    """Largest image side in pixels."""
    force_zeros_for_empty_prompt: bool = False
    """SDXL pipeline setting: an empty negative prompt is all-zero embeddings rather than encoded ""."""
    t5_max_length: int = 256
    """SD3 only: token length of the T5 part of the prompt (zeros when the model has no T5)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts about the source (for example the folder path); not used for computing."""

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for every Stable Diffusion VAE)."""
        return int(2 ** (len(self.vae.config.block_out_channels) - 1))

    @property
    def latent_channels(self) -> int:
        """Channels of the latent image: 4 for sd15/sd2/sdxl, 16 for sd3."""
        return int(self.vae.config.latent_channels)

    @property
    def size_unit(self) -> int:
        """Both image sides must be a multiple of this many pixels.

        A U-Net halves the latent once per downsampler, and a transformer groups `patch_size` cells
        into one token, so smaller steps would not split evenly into the model's grid.
        """
        if self.family == "sd3":
            return self.vae_scale_factor * int(self.denoiser.config.patch_size)
        downsamplers = sum(
            getattr(block, "downsamplers", None) is not None for block in self.denoiser.down_blocks
        )
        return self.vae_scale_factor * 2**downsamplers

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ModelBundle:
        """Moves every module in place (shared with all holders of this bundle) and returns the bundle."""
        modules: list[torch.nn.Module] = [self.denoiser, self.vae, *self.text_encoders]
        for module in modules:
            module.to(device=device, dtype=dtype)
        return self

    def channels_last(self) -> ModelBundle:
        """Lays the denoiser's and the VAE's convolution weights out channels-last (NHWC), in place,
        and returns the bundle. Convolutions then run without layout conversions and pass the layout
        on to their outputs; values are unchanged, results differ only by float rounding. On this
        repository's 2-core CPU a model-forward step ran 0-18% faster and a VAE decode 18-32%, a
        mixed patched step within noise (docs/benchmark-log.md, session 7); not measured on a GPU.
        Moves with ``to`` keep the layout."""
        for module in (self.denoiser, self.vae):
            module.to(memory_format=torch.channels_last)
        return self

    def diffusers_pipeline(self, scheduler: SchedulerMixin) -> Any:
        """The family's diffusers pipeline built from this bundle's components, safety checker off.

        Used as the reference our own pipeline is checked against, and by `save_pretrained`.
        """
        if self.family in ("sd15", "sd2"):
            return StableDiffusionPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                tokenizer=self.tokenizers[0],
                unet=self.denoiser,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        if self.family == "sdxl":
            return StableDiffusionXLPipeline(
                vae=self.vae,
                text_encoder=self.text_encoders[0],
                text_encoder_2=self.text_encoders[1],
                tokenizer=self.tokenizers[0],
                tokenizer_2=self.tokenizers[1],
                unet=self.denoiser,
                scheduler=scheduler,
                force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt,
                add_watermarker=False,
            )
        has_t5 = len(self.text_encoders) > 2
        return StableDiffusion3Pipeline(
            transformer=self.denoiser,
            scheduler=scheduler,
            vae=self.vae,
            text_encoder=self.text_encoders[0],
            tokenizer=self.tokenizers[0],
            text_encoder_2=self.text_encoders[1],
            tokenizer_2=self.tokenizers[1],
            text_encoder_3=self.text_encoders[2] if has_t5 else None,
            tokenizer_3=self.tokenizers[2] if has_t5 else None,
        )

    def default_scheduler(self) -> SchedulerMixin:
        """The diffusers scheduler object described by `scheduler_config`."""
        import diffusers

        config = dict(self.scheduler_config)
        scheduler_class = getattr(diffusers, config.pop("_class_name"))
        scheduler: SchedulerMixin = scheduler_class.from_config(config)
        return scheduler

    def save_pretrained(self, folder: str | Path) -> Path:
        """Writes a diffusers-format folder (with model_index.json) that `load_model(folder)` reads back."""
        folder = Path(folder)
        with quiet_hf():  # "text_encoder_3=None cannot be saved" is expected for sd3 without T5
            pipe = self.diffusers_pipeline(self.default_scheduler())
            pipe.save_pretrained(folder, safe_serialization=True)
        return folder
