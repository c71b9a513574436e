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

from diffusers import (
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from patchedserve.models.bundle import Family, GenerationDefaults, ModelBundle
from patchedserve.models.fullsize import build_sd3_arch, build_sdxl_arch
from patchedserve.models.parts import (
    ClipWidths,
    build_vae,
    clip_encoder,
    scheduler_config,
    sd_scheduler_config,
    seeded,
)
from patchedserve.models.tokenizer import build_clip_tokenizer

TINY_SAMPLE_SIZE = 64
"""Latent side of the default image: 64 cells x 8 px = 512 px, as in diffusers' `sample_size`."""
TINY_STEPS = 20
"""Default step count of the tiny models (their images are noise; 50 steps would only cost time)."""


_CLIP_L = ClipWidths(hidden=32, heads=2, act="quick_gelu")
"""Stands in for OpenAI CLIP ViT-L/14 (SD 1.5, SDXL encoder 1, SD3 encoder 1)."""
_CLIP_G = ClipWidths(hidden=64, heads=4, act="gelu")
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


def build_tiny_sd15() -> ModelBundle:
    """SD 1.5 layout: CrossAttnDownBlock2D levels, a DownBlock2D bottom, UNetMidBlock2DCrossAttn, one CLIP."""
    unet = seeded(
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
        vae=build_vae(1502, 4, scaling_factor=0.18215, shift_factor=None),
        text_encoders=[clip_encoder(1503, _CLIP_L, projection=False)],
        tokenizers=[build_clip_tokenizer()],
        scheduler_config=sd_scheduler_config(DDIMScheduler),
        default_sampler="ddim",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=7.5),
    )


def build_tiny_sdxl() -> ModelBundle:
    """SDXL layout: DownBlock2D then CrossAttnDownBlock2D levels with transformer_layers_per_block,
    "text_time" added conditioning, CLIPTextModel + CLIPTextModelWithProjection."""
    time_embed_dim = 8
    unet = seeded(
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
        vae=build_vae(2002, 4, scaling_factor=0.13025, shift_factor=None),
        text_encoders=[
            clip_encoder(2003, _CLIP_L, projection=False),
            clip_encoder(2004, _CLIP_G, projection=True),
        ],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=sd_scheduler_config(EulerDiscreteScheduler),
        default_sampler="euler",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=5.0),
        force_zeros_for_empty_prompt=True,
    )


def build_tiny_sd3() -> ModelBundle:
    """SD3 layout: SD3Transformer2DModel (joint attention, patch 2), CLIP-L and CLIP-G with projection,
    no T5 (the pipeline then feeds zeros in its place), 16-channel VAE with a shift factor."""
    pooled_dim = _CLIP_L.hidden + _CLIP_G.hidden
    transformer = seeded(
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
        vae=build_vae(3002, 16, scaling_factor=1.5305, shift_factor=0.0609),
        text_encoders=[
            clip_encoder(3003, _CLIP_L, projection=True),
            clip_encoder(3004, _CLIP_G, projection=True),
        ],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=scheduler_config(
            FlowMatchEulerDiscreteScheduler, num_train_timesteps=1000, shift=3.0
        ),
        default_sampler="flow_euler",
        defaults=GenerationDefaults(width=512, height=512, steps=TINY_STEPS, guidance_scale=7.0),
    )


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    model.name: model
    for model in (
        BuiltinModel("tiny-sd15", "sd15", "Stable Diffusion 1.5 layout, DDIM", build_tiny_sd15),
        BuiltinModel("tiny-sdxl", "sdxl", "SDXL layout, two CLIP encoders, Euler", build_tiny_sdxl),
        BuiltinModel("tiny-sd3", "sd3", "SD3 MMDiT layout, flow matching, no T5", build_tiny_sd3),
        BuiltinModel(
            "sdxl-arch", "sdxl", "SDXL base 1.0 at full size, random weights (GPU)", build_sdxl_arch
        ),
        BuiltinModel(
            "sd3-arch", "sd3", "SD3 medium at full size, no T5, random weights (GPU)", build_sd3_arch
        ),
    )
}
"""Built-in models by name; ``tiny-sdxl`` is the default. The ``-arch`` models (`models.fullsize`)
are the published layouts at full width, for timing on a GPU."""
