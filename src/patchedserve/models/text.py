"""Prompt encoding: `encode_prompts` turns prompts into per-request `Conditioning`, as diffusers does.

Called by the reference pipeline and the engine, once per request and branch (positive, negative).
Each family follows its diffusers pipeline's ``encode_prompt`` exactly:

- sd15 / sd2: CLIP last hidden state (after the final layer norm); no pooled vector.
- sdxl: penultimate hidden states of both CLIP encoders concatenated; pooled projection of encoder 2;
  an empty *negative* prompt is all zeros when the model's ``force_zeros_for_empty_prompt`` is set.
- sd3: penultimate hidden states of CLIP-L and CLIP-G concatenated, zero-padded to the T5 width,
  followed by the T5 sequence (zeros when the model has no T5); pooled = both CLIP projections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from patchedserve.models.bundle import ModelBundle


@dataclass
class Conditioning:
    """The text conditioning of one request for one branch (positive or negative prompt)."""

    prompt_embeds: torch.Tensor
    """[L, D] token embeddings passed as ``encoder_hidden_states``."""
    pooled: torch.Tensor | None
    """[Dp] SDXL ``text_embeds`` / SD3 ``pooled_projections``; None for sd15 and sd2."""


def stack_conditioning(conds: Sequence[Conditioning]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stacks per-request conditioning into batch tensors ([B, L, D], [B, Dp] or None)."""
    embeds = torch.stack([c.prompt_embeds for c in conds])
    pooled = [c.pooled for c in conds]
    if any(p is None for p in pooled):
        return embeds, None
    return embeds, torch.stack(pooled)  # type: ignore[arg-type]


@torch.inference_mode()
def encode_prompts(
    bundle: ModelBundle, prompts: Sequence[str], negative: bool | Sequence[bool] = False
) -> list[Conditioning]:
    """Encodes prompts in one batch per text encoder; one `Conditioning` per prompt.

    Args:
        bundle: the model whose text encoders and tokenizers are used.
        prompts: the texts; "" is allowed.
        negative: whether each prompt is a negative prompt (one flag for all, or one per prompt).
            Only SDXL cares: an empty negative prompt is zeros when ``force_zeros_for_empty_prompt``
            is set, exactly as diffusers treats ``negative_prompt=None``.
    """
    prompts = list(prompts)
    flags = [negative] * len(prompts) if isinstance(negative, bool) else list(negative)
    if len(flags) != len(prompts):
        raise ValueError(f"got {len(flags)} negative flags for {len(prompts)} prompts")
    if not prompts:
        return []
    if bundle.family in ("sd15", "sd2"):
        embeds, pooled = _encode_sd(bundle, prompts), None
    elif bundle.family == "sdxl":
        embeds, pooled = _encode_sdxl(bundle, prompts)
        if bundle.force_zeros_for_empty_prompt:
            zero = torch.tensor(
                [f and p == "" for p, f in zip(prompts, flags, strict=True)], device=embeds.device
            )
            embeds = embeds.masked_fill(zero[:, None, None], 0.0)
            pooled = pooled.masked_fill(zero[:, None], 0.0)
    else:
        embeds, pooled = _encode_sd3(bundle, prompts)
    return [
        Conditioning(prompt_embeds=embeds[i], pooled=None if pooled is None else pooled[i])
        for i in range(len(prompts))
    ]


def sdxl_time_ids(bundle: ModelBundle, height: int, width: int) -> torch.Tensor:
    """[6] SDXL micro-conditioning: original size, crop top-left (0, 0), target size, as diffusers."""
    return torch.tensor([height, width, 0, 0, height, width], dtype=bundle.dtype, device=bundle.device)


def _token_ids(tokenizer: Any, prompts: list[str], max_length: int, device: torch.device) -> torch.Tensor:
    """[B, max_length] token ids, padded and truncated like the diffusers pipelines."""
    ids = tokenizer(
        prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return ids.to(device)


def _encode_sd(bundle: ModelBundle, prompts: list[str]) -> torch.Tensor:
    encoder, tokenizer = bundle.text_encoders[0], bundle.tokenizers[0]
    inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = inputs.attention_mask.to(bundle.device)
    hidden = encoder(inputs.input_ids.to(bundle.device), attention_mask=mask)[0]
    return hidden.to(encoder.dtype)


def _clip_penultimate(
    encoder: Any, tokenizer: Any, prompts: list[str], max_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, 77, D] penultimate hidden state, first output: [B, P] projection or [B, 77, D] hidden)."""
    ids = _token_ids(tokenizer, prompts, max_length, next(encoder.parameters()).device)
    out = encoder(ids, output_hidden_states=True)
    return out.hidden_states[-2], out[0]


def _encode_sdxl(bundle: ModelBundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    hidden = []
    pooled: torch.Tensor | None = None
    for encoder, tokenizer in zip(bundle.text_encoders, bundle.tokenizers, strict=True):
        states, first = _clip_penultimate(encoder, tokenizer, prompts, tokenizer.model_max_length)
        hidden.append(states)
        # diffusers keeps the first 2-D output: the projection of the encoder with one.
        if pooled is None and first.ndim == 2:
            pooled = first
    if pooled is None:
        raise ValueError("an SDXL model needs a text encoder with a projection (CLIPTextModelWithProjection)")
    dtype = bundle.text_encoders[-1].dtype
    return torch.cat(hidden, dim=-1).to(dtype), pooled


def _encode_sd3(bundle: ModelBundle, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    clip_length = bundle.tokenizers[0].model_max_length
    dtype = bundle.text_encoders[0].dtype
    (enc_l, enc_g), (tok_l, tok_g) = bundle.text_encoders[:2], bundle.tokenizers[:2]
    states_l, pooled_l = _clip_penultimate(enc_l, tok_l, prompts, clip_length)
    states_g, pooled_g = _clip_penultimate(enc_g, tok_g, prompts, clip_length)
    clip_states = torch.cat([states_l.to(dtype), states_g.to(dtype)], dim=-1)
    t5 = _encode_t5(bundle, prompts, dtype)
    clip_states = torch.nn.functional.pad(clip_states, (0, t5.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5], dim=-2), torch.cat([pooled_l, pooled_g], dim=-1)


def _encode_t5(bundle: ModelBundle, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
    """[B, t5_max_length, joint_attention_dim] T5 states, or zeros when the model has no T5."""
    if len(bundle.text_encoders) < 3:
        width = int(bundle.denoiser.config.joint_attention_dim)
        return torch.zeros(len(prompts), bundle.t5_max_length, width, dtype=dtype, device=bundle.device)
    encoder, tokenizer = bundle.text_encoders[2], bundle.tokenizers[2]
    ids = _token_ids(tokenizer, prompts, bundle.t5_max_length, next(encoder.parameters()).device)
    return encoder(ids)[0].to(encoder.dtype)
