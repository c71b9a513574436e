"""Building blocks of the built-in models: seeded construction, CLIP text encoders, VAEs, schedules.

Shared by `models.builtin` (the tiny models) and `models.fullsize` (the published layouts at full
width). Every module is built under its own fixed seed, so it is identical on every build.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from patchedserve.models.tokenizer import CLIP_MAX_LENGTH, build_clip_tokenizer


@dataclass(frozen=True)
class ClipWidths:
    """Widths of a CLIP text encoder; `hidden` is also its projection size."""

    hidden: int
    heads: int
    act: str
    layers: int = 2
    mlp_ratio: int = 2


def seeded(seed: int, make: Callable[[], Any]) -> Any:
    """Builds a module under a fixed seed without disturbing the caller's random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make().eval().requires_grad_(False)


def clip_encoder(seed: int, widths: ClipWidths, projection: bool) -> Any:
    """A CLIP text encoder of `widths` over the built-in tokenizer's vocabulary."""
    tokenizer = build_clip_tokenizer()
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=widths.hidden,
        intermediate_size=widths.mlp_ratio * widths.hidden,
        num_attention_heads=widths.heads,
        num_hidden_layers=widths.layers,
        hidden_act=widths.act,
        projection_dim=widths.hidden,
        max_position_embeddings=CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
    return seeded(seed, lambda: model_class(config))


def build_vae(
    seed: int,
    latent_channels: int,
    scaling_factor: float,
    shift_factor: float | None,
    widths: tuple[int, int, int, int] = (8, 16, 32, 32),
    layers: int = 1,
    groups: int = 8,
    sample_size: int = 512,
) -> Any:
    """An AutoencoderKL with four blocks of `widths` channels: 8x down like every Stable Diffusion VAE."""
    sd3 = latent_channels == 16
    return seeded(
        seed,
        lambda: AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=widths,
            layers_per_block=layers,
            norm_num_groups=groups,
            latent_channels=latent_channels,
            sample_size=sample_size,
            scaling_factor=scaling_factor,
            shift_factor=shift_factor,
            use_quant_conv=not sd3,
            use_post_quant_conv=not sd3,
        ),
    )


def sd_scheduler_config(scheduler_class: Any) -> dict[str, object]:
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
    return scheduler_config(scheduler_class, **schedule) | schedule


def scheduler_config(scheduler_class: Any, **settings: object) -> dict[str, object]:
    """The full config (``_class_name`` and every field) of `scheduler_class` built with `settings`.

    Built on the CPU whatever the default device, so ``patchedserve models`` can build bundles on
    the meta device to read their defaults.
    """
    with torch.device("cpu"):
        scheduler = scheduler_class.from_config(settings)
    config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
    return {"_class_name": type(scheduler).__name__, **config}
