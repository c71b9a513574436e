"""`decode_latents`: final latents to PIL images, with the scaling and post-processing of diffusers.

Called by the reference pipeline and the engine once a request's last step is done.
"""

from __future__ import annotations

import PIL.Image
import torch
from diffusers.image_processor import VaeImageProcessor

from patchedserve.models.bundle import ModelBundle


def unscale_latents(bundle: ModelBundle, latents: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] latents in the VAE's own space: undoes scaling_factor (and the sd3 shift or the
    SDXL-style per-channel mean/std when the VAE config has them), as each diffusers pipeline does."""
    config = bundle.vae.config
    if bundle.family == "sd3":
        return latents / config.scaling_factor + config.shift_factor
    mean = getattr(config, "latents_mean", None)
    std = getattr(config, "latents_std", None)
    if bundle.family == "sdxl" and mean is not None and std is not None:
        channels = latents.shape[1]
        mean_t = torch.tensor(mean).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        std_t = torch.tensor(std).view(1, channels, 1, 1).to(latents.device, latents.dtype)
        return latents * std_t / config.scaling_factor + mean_t
    return latents / config.scaling_factor


@torch.inference_mode()
def decode_latents(
    bundle: ModelBundle,
    latents: torch.Tensor,  # [B, C, h, w] final sampler output
) -> list[PIL.Image.Image]:
    """Decodes a batch of latents with the VAE (in its own dtype) into B RGB images."""
    vae_param = next(bundle.vae.parameters())
    latents = unscale_latents(bundle, latents.to(device=vae_param.device, dtype=vae_param.dtype))
    images = bundle.vae.decode(latents, return_dict=False)[0]  # [B, 3, H, W] in [-1, 1]
    processor = VaeImageProcessor(vae_scale_factor=bundle.vae_scale_factor)
    return processor.postprocess(images, output_type="pil")
