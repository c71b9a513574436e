"""Installs the patch-aware operators on a diffusers denoiser, in place, sharing its weights.

One pass over the module tree decides, per module, which patched forward it gets: halo convs,
per-image GroupNorms (fused with the following conv's halo where the block structure allows it),
per-image attention processors, and for SD3 the positional embedding and context-stream norms.
The denoiser's blocks get the patch cache's entry point (inert unless the model runs with a cache).
Anything the patched path cannot make exact is refused here, at construction, with a clear error.
Called by ``PatchedModel``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import PatchEmbed
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from torch import nn

from patchedserve.patch.cache_parts import BlockSpec
from patchedserve.patch.context import get_forward_context
from patchedserve.patch.hooks import is_patched, set_patched_forward
from patchedserve.patch.ops_attention import PatchedAttnProcessor, PatchedJointAttnProcessor
from patchedserve.patch.ops_conv import conv_halo, patch_conv2d
from patchedserve.patch.ops_norm import patch_group_norm
from patchedserve.patch.ops_sd3 import patch_context_norm, patch_pos_embed


def _zero_preserving(act: nn.Module) -> bool:
    with torch.no_grad():
        return bool(act(torch.zeros(1)).abs().max() == 0)


def _fusable_pairs(model: nn.Module) -> list[tuple[nn.GroupNorm, nn.Conv2d]]:
    """(GroupNorm, Conv2d) pairs where only a zero-preserving activation sits between them."""
    pairs: list[tuple[nn.Module, nn.Module]] = []
    for m in model.modules():
        if isinstance(m, ResnetBlock2D) and _zero_preserving(m.get_submodule("nonlinearity")):
            if m.upsample is None and m.downsample is None:
                pairs.append((m.get_submodule("norm1"), m.get_submodule("conv1")))
            if m.time_embedding_norm == "default":
                pairs.append((m.get_submodule("norm2"), m.get_submodule("conv2")))
    conv_act = getattr(model, "conv_act", None)
    has_out_norm = isinstance(model, UNet2DConditionModel) and model.conv_norm_out is not None
    if has_out_norm and conv_act is not None and _zero_preserving(conv_act):
        pairs.append((model.get_submodule("conv_norm_out"), model.get_submodule("conv_out")))
    return [
        (n, c)
        for n, c in pairs
        if isinstance(n, nn.GroupNorm) and isinstance(c, nn.Conv2d) and conv_halo(c) > 0
    ]


def _refuse_unsupported(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if isinstance(m, nn.ConvTranspose2d | nn.Conv1d | nn.Conv3d):
            raise ValueError(f"{name}: {type(m).__name__} is not supported by patched execution")
        if isinstance(m, Downsample2D) and m.use_conv and m.padding == 0:
            raise ValueError(f"{name}: Downsample2D with padding=0 pads asymmetrically; not supported")
        if isinstance(m, Upsample2D) and (m.use_conv_transpose or not m.interpolate):
            raise ValueError(f"{name}: Upsample2D without nearest interpolation is not supported")


def wrap_unet(model: nn.Module) -> None:
    _refuse_unsupported(model)
    pairs = _fusable_pairs(model)
    fused_norms = {id(n): conv_halo(c) for n, c in pairs}
    prepadded = {id(c) for _, c in pairs}
    for m in model.modules():
        if is_patched(m):
            continue
        if isinstance(m, nn.Conv2d):
            patch_conv2d(m, prepadded=id(m) in prepadded)
        elif isinstance(m, nn.GroupNorm):
            patch_group_norm(m, emit_halo=fused_norms.get(id(m), 0))
        elif isinstance(m, Attention) and not isinstance(m.processor, PatchedAttnProcessor):
            m.set_processor(PatchedAttnProcessor(m.processor))  # type: ignore[arg-type]
    blocks: Any = model
    for name in ("down_blocks", "up_blocks"):
        for i, block in enumerate(blocks.get_submodule(name)):
            _cache_block(block, f"{name}.{i}")
    if blocks.mid_block is not None:
        _cache_block(blocks.mid_block, "mid_block")


def wrap_sd3(model: nn.Module) -> None:
    _refuse_unsupported(model)
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and conv_halo(m) > 0:
            raise ValueError(f"{name}: SD3 convs with a halo are unexpected")
        if isinstance(m, nn.GroupNorm):
            raise ValueError(f"{name}: GroupNorm inside an SD3 transformer is unexpected")
    pos_embed = model.get_submodule("pos_embed")
    if not is_patched(pos_embed):
        assert isinstance(pos_embed, PatchEmbed)
        patch_pos_embed(pos_embed)
    blocks: Any = model.get_submodule("transformer_blocks")
    for block in blocks:
        if not is_patched(block.norm1_context):
            patch_context_norm(block.norm1_context)
        for attn in (block.attn, getattr(block, "attn2", None)):
            if attn is not None and not isinstance(attn.processor, PatchedJointAttnProcessor):
                attn.set_processor(PatchedJointAttnProcessor(attn.processor))
    for i, block in enumerate(blocks):
        _cache_block(
            block, f"transformer_blocks.{i}", per_entry_outputs=frozenset({0}), entry_emb_from="temb"
        )


def _cache_block(
    block: nn.Module,
    key: str,
    per_entry_outputs: frozenset[int] = frozenset(),
    entry_emb_from: str | None = None,
) -> None:
    """Route ``block`` through the patch cache when the forward has one (``patch.cache``)."""
    if is_patched(block):
        return
    signature = inspect.signature(block.forward)
    names = signature.parameters
    spec = BlockSpec(
        signature=signature,
        per_patch=tuple(n for n in ("hidden_states", "res_hidden_states_tuple", "temb") if n in names),
        watch=tuple(n for n in ("hidden_states", "res_hidden_states_tuple") if n in names),
        per_entry_outputs=per_entry_outputs,
        entry_emb_from=entry_emb_from,
        per_entry=tuple(n for n in ("encoder_hidden_states",) if n in names),
    )

    def forward(original: Any, *args: Any, **kwargs: Any) -> Any:
        ctx = get_forward_context()
        if ctx is None or ctx.cache is None:
            return original(*args, **kwargs)
        return ctx.cache.run_block(key, spec, original, args, kwargs, ctx)

    set_patched_forward(block, forward)
