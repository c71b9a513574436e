"""Built-in models at full size: the published SDXL and SD3-medium layouts with random weights.

Called by `models.loading.load_model` for ``sdxl-arch`` and ``sd3-arch``. Every width, depth and head
count is that of the released checkpoint's config (SDXL base 1.0: a 2.6B-parameter U-Net; SD3
medium: a 2B-parameter MMDiT; CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text encoders; the 8x VAEs),
so a step costs what the real model's step costs on the same device and dtype. The weights are
random under fixed seeds (nothing is downloaded), so the images are noise: these models are for
timing and for exactness at real widths, on a GPU. The text encoders keep the built-in tokenizer's
small vocabulary: that changes an embedding table, not the cost of a step.

Building one takes about a minute on a 2-core CPU and up to 14 GB of memory in float32 (sdxl-arch).
"""

from __future__ import annotations

from diffusers import (
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)

from patchedserve.models.bundle import GenerationDefaults, ModelBundle
from patchedserve.models.parts import (
    ClipWidths,
    build_vae,
    clip_encoder,
    scheduler_config,
    sd_scheduler_config,
    seeded,
)
from patchedserve.models.tokenizer import build_clip_tokenizer

CLIP_L = ClipWidths(hidden=768, heads=12, act="quick_gelu", layers=12, mlp_ratio=4)
"""OpenAI CLIP ViT-L/14's text tower (SDXL encoder 1, SD3 encoder 1)."""
CLIP_G = ClipWidths(hidden=1280, heads=20, act="gelu", layers=32, mlp_ratio=4)
"""OpenCLIP ViT-bigG/14's text tower (SDXL encoder 2, SD3 encoder 2)."""

FULL_SAMPLE_SIZE = 128
"""Latent side of the default 1024 px image."""

SDXL_UNET: dict[str, object] = {
    "sample_size": FULL_SAMPLE_SIZE,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "cross_attention_dim": CLIP_L.hidden + CLIP_G.hidden,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 6 * 256 + CLIP_G.hidden,
}
"""SDXL base 1.0's U-Net config (the fields that differ from diffusers' defaults)."""

SD3_MEDIUM_TRANSFORMER: dict[str, object] = {
    "sample_size": FULL_SAMPLE_SIZE,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": CLIP_L.hidden + CLIP_G.hidden,
    "pos_embed_max_size": 192,
}
"""SD3 medium's MMDiT config; its position table covers 192 x 2 latent cells = 3072 px."""

_VAE_WIDTHS = (128, 256, 512, 512)
"""Channels of the four blocks of every Stable Diffusion VAE."""


def build_sdxl_arch() -> ModelBundle:
    """SDXL base 1.0's layout at full width, random weights, Euler; 1024x1024 and 50 steps by default."""
    return ModelBundle(
        name="sdxl-arch",
        family="sdxl",
        denoiser=seeded(4001, lambda: UNet2DConditionModel(**SDXL_UNET)),
        vae=build_vae(4002, 4, 0.13025, None, widths=_VAE_WIDTHS, layers=2, groups=32, sample_size=1024),
        text_encoders=[
            clip_encoder(4003, CLIP_L, projection=False),
            clip_encoder(4004, CLIP_G, projection=True),
        ],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=sd_scheduler_config(EulerDiscreteScheduler),
        default_sampler="euler",
        defaults=GenerationDefaults(width=1024, height=1024, steps=50, guidance_scale=5.0),
        force_zeros_for_empty_prompt=True,
    )


def build_sd3_arch() -> ModelBundle:
    """SD3 medium's layout at full width without T5, random weights; 1024x1024 and 28 steps by default."""
    return ModelBundle(
        name="sd3-arch",
        family="sd3",
        denoiser=seeded(5001, lambda: SD3Transformer2DModel(**SD3_MEDIUM_TRANSFORMER)),
        vae=build_vae(5002, 16, 1.5305, 0.0609, widths=_VAE_WIDTHS, layers=2, groups=32, sample_size=1024),
        text_encoders=[
            clip_encoder(5003, CLIP_L, projection=True),
            clip_encoder(5004, CLIP_G, projection=True),
        ],
        tokenizers=[build_clip_tokenizer(), build_clip_tokenizer()],
        scheduler_config=scheduler_config(
            FlowMatchEulerDiscreteScheduler, num_train_timesteps=1000, shift=3.0
        ),
        default_sampler="flow_euler",
        defaults=GenerationDefaults(width=1024, height=1024, steps=28, guidance_scale=7.0),
    )
