"""`denoiser_forward`: one call of a bundle's U-Net or SD3 transformer with the family's arguments.

Called by the reference pipeline for full images; the patched engine calls the same function so that
the two paths differ only in what the sample tensor holds.
"""

from __future__ import annotations

import torch

from patchedserve.models.bundle import ModelBundle


def denoiser_forward(
    bundle: ModelBundle,
    sample: torch.Tensor,  # [B, C, h, w] latents, already scaled by the sampler
    timestep: torch.Tensor,  # [B] denoiser timestep of each row
    prompt_embeds: torch.Tensor,  # [B, L, D]
    pooled: torch.Tensor | None = None,  # [B, Dp] sdxl / sd3
    time_ids: torch.Tensor | None = None,  # [B, 6] sdxl
) -> torch.Tensor:  # [B, C, h, w] model output (noise, v or flow, as the model was trained)
    """Runs the denoiser once; the caller owns batching, guidance and the sampler step."""
    if bundle.family == "sd3":
        if pooled is None:
            raise ValueError("an sd3 denoiser call needs pooled projections")
        out = bundle.denoiser(
            hidden_states=sample,
            timestep=timestep,
            encoder_hidden_states=prompt_embeds,
            pooled_projections=pooled,
            return_dict=False,
        )
        return out[0]
    added = None
    if bundle.family == "sdxl":
        if pooled is None or time_ids is None:
            raise ValueError("an sdxl denoiser call needs pooled text embeddings and time ids")
        added = {"text_embeds": pooled, "time_ids": time_ids}
    out = bundle.denoiser(
        sample,
        timestep,
        encoder_hidden_states=prompt_embeds,
        added_cond_kwargs=added,
        return_dict=False,
    )
    return out[0]
