"""The built-in tiny models: real diffusers/transformers classes with each family's block layout.

Called by `models.loading.load_model` for the names in `BUILTIN_MODELS`. Every module is randomly
initialised under its own fixed seed, so a model is identical on every build and machine; widths are
tiny so that one denoising step at 512x512 takes a fraction of a second on a laptop CPU. The images
are noise, but every code path (CFG, SDXL micro-conditioning, SD3 joint attention, 16-channel latents)
is the real one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from patchedserve.models.bundle import Family, GenerationDefaults, ModelBundle
from patchedserve.models.tokenizer import CLIP_MAX_LENGTH, build_clip_tokenizer

TINY_SAMPLE_SIZE = 64
"""Latent side of the default image: 64 cells x 8 px = 512 px, as in diffusers' `sample_size`."""
TINY_STEPS = 20
"""Default step count of the tiny models (their images are noise; 50 steps would only cost time)."""


@dataclass(frozen=True)
class _ClipWidths:
    """Widths of a tiny CLIP text encoder; `hidden` is also its projection size."""

    hidden: int
    heads: int
    act: str


_CLIP_L = _ClipWidths(hidden=32, heads=2, act="quick_gelu")
"""Stands in for OpenAI CLIP ViT-L/14 (SD 1.5, SDXL encoder 1, SD3 encoder 1)."""
_CLIP_G = _ClipWidths(hidden=64, heads=4, act="gelu")
"""Stands in for OpenCLIP ViT-bigG/14 (SDXL encoder 2, SD3 encoder 2)."""


@dataclass(frozen=True)
class BuiltinModel:
    """One entry of the built-in model table."""

    name: str
    """Name passed to `load_model` and ``--model``."""
    family: Family
    """Diffusers pipeline family the model imitates."""
    description: str
    """One line for ``patchedserve models``."""
    build: Callable[[], ModelBundle]
    """Builds a fresh bundle; `load_model` caches the result."""


def _seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Builds a module under a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval().requires_grad_(False)


def _clip(seed: int, widths: _ClipWidths, projection: bool) -> Any:
    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=widths.hidden,
        intermediate_size=2 * widths.hidden,
        num_attention_heads=widths.heads,
        num_hidden_layers=2,
        hidden_act=widths.act,
        projection_dim=widths.hidden,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return _seeded(seed, lambda: model_class(config))


def _vae(seed: int, latent_channels: int, scaling_factor: float, shift_factor: float | None) -> Any:
    # Four blocks, so the VAE downsamples 8x like every Stable Diffusion VAE.
    sd3 = latent_channels == 16
    return _seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            latent_channels=latent_channels,
            sample_size=TINY_SAMPLE_SIZE * 8,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=not sd3,
            use_post_quant_conv=not sd3,
        ),
    )


def _sd_scheduler_config(scheduler_class: Any) -> dict[str, object]:
    """The Stable Diffusion 1.x/XL noise schedule (scaled-linear betas, leading spacing, offset 1).

    Like the released checkpoints' configs it also says clip_sample=False and set_alpha_to_one=False,
    so switching the model to DDIM gives the DDIM those checkpoints were published with.
    """
    schedule = {
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "clip_sample": False,
        "set_alpha_to_one": False,
    }
    return _config_of(scheduler_class.from_config(schedule)) | schedule


def _config_of(scheduler: Any) -> dict[str, object]:
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return {"_class_name": type(scheduler).__name__, **config}


def build_tiny_sd15() -> ModelBundle:
    """SD 1.5 layout: CrossAttnDownBlock2D levels, a DownBlock2D bottom, UNetMidBlock2DCrossAttn, one CLIP."""
    unet = _seeded(
        1501,
        lambda: UNet2DConditionModel(
            sample_size=TINY_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=16,
            cross_attention_dim=_CLIP_L.hidden,
            attention_head_dim=(1, 2, 2),  # heads per level; one head keeps 64x64 self-attention cheap
        ),
    )
    return ModelBundle(
        name="tiny-sd15",
        family="sd15",
        denoiser=unet,
        vae=_vae(1502, 4, scaling_factor=0.18215, shift_factor=None),
        text_encoders=[_clip(1503, _CLIP_L, projection=False)],
        tokenizers=[build_clip_tokenizer()],
        scheduler_config=_sd_scheduler_config(DDIMScheduler),
        default_sampler="ddim",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=7.5),
    )


def build_tiny_sdxl() -> ModelBundle:
    """SDXL layout: DownBlock2D then CrossAttnDownBlock2D levels with transformer_layers_per_block,
    "text_time" added conditioning, CLIPTextModel + CLIPTextModelWithProjection."""
    time_embed_dim = 8
    unet = _seeded(
        2001,
        lambda: UNet2DConditionModel(
            sample_size=TINY_SAMPLE_SIZE,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 64, 64),
            layers_per_block=1,
            norm_num_groups=16,
            transformer_layers_per_block=(1, 1, 2),
            attention_head_dim=(2, 4, 4),
            use_linear_projection=True,
            cross_attention_dim=_CLIP_L.hidden + _CLIP_G.hidden,
            addition_embed_type="text_time",
            addition_time_embed_dim=time_embed_dim,
            projection_class_embeddings_input_dim=6 * time_embed_dim + _CLIP_G.hidden,
        ),
    )
    return ModelBundle(
        name="tiny-sdxl",
        family="sdxl",
        denoiser=unet,
        vae=_vae(2002, 4, scaling_factor=0.13025, shift_factor=None),
        text_encoders=[_clip(2003, _CLIP_L, projection=False), _clip(2004, _CLIP_G, projection=True)],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=_sd_scheduler_config(EulerDiscreteScheduler),
        default_sampler="euler",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=5.0),
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3() -> ModelBundle:
    """SD3 layout: SD3Transformer2DModel (joint attention, patch 2), CLIP-L and CLIP-G with projection,
    no T5 (the pipeline then feeds zeros in its place), 16-channel VAE with a shift factor."""
    pooled_dim = _CLIP_L.hidden + _CLIP_G.hidden
    transformer = _seeded(
        3001,
        lambda: SD3Transformer2DModel(
            sample_size=TINY_SAMPLE_SIZE,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=4,
            joint_attention_dim=128,
            caption_projection_dim=64,
            pooled_projection_dim=pooled_dim,
            # Largest latent side / patch size: the position table covers 2048 px images.
            pos_embed_max_size=2048 // 8 // 2,
        ),
    )
    return ModelBundle(
        name="tiny-sd3",
        family="sd3",
        denoiser=transformer,
        vae=_vae(3002, 16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoders=[_clip(3003, _CLIP_L, projection=True), _clip(3004, _CLIP_G, projection=True)],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=_config_of(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)),
        default_sampler="flow_euler",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=7.0),
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel("tiny-sd15", "sd15", "Stable Diffusion 1.5 layout, DDIM", build_tiny_sd15),
        BuiltinModel("tiny-sdxl", "sdxl", "SDXL layout, two CLIP encoders, Euler", build_tiny_sdxl),
        BuiltinModel("tiny-sd3", "sd3", "SD3 MMDiT layout, flow matching, no T5", build_tiny_sd3),
    )
}
"""Built-in models by name; ``tiny-sdxl`` is the default."""

DEFAULT_MODEL = "tiny-sdxl"
