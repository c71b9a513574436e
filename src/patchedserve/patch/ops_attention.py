"""Patch-aware attention processors: every image attends over its whole self, exactly.

Entries with the same patch count are contiguous in the CSP layout (see ``layout.csp``), so the
tokens of a group ``[R_g * P, T, C]`` are viewed, without copying, as ``[R_g, P * T, C]``: one
``scaled_dot_product_attention`` call per group covers every image of that size. Token order inside
an image does not matter to attention (no positional term inside these blocks), so no reordering to
raster order is needed.

* U-Net self-attention (``attn1``): queries, keys and values all come from the entry's patches.
* U-Net cross-attention (``attn2``): ``encoder_hidden_states`` arrive per entry ``[R, L, D]``, so
  keys and values are projected once per entry, not once per patch.
* SD3 joint attention: image tokens of the whole entry plus its context tokens ``[R, L, D]``.

Outside a patched forward each processor delegates to the processor it replaced.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn

from patchedserve.patch.context import PatchContext, get_forward_context, timed
from patchedserve.patch.ops_attention_partial import (
    merge_heads,
    partial_attention,
    partial_joint_groups,
    refreshed_kv,
    split_heads,
)


def grouped_attention(
    attn: Attention,
    query: torch.Tensor,  # [N, T, H*d] per patch
    key: torch.Tensor,  # [N, T, H*d] per patch, or [R, L, H*d] per entry when ``per_entry_kv``
    value: torch.Tensor,
    ctx: PatchContext,
    per_entry_kv: bool,
) -> torch.Tensor:  # [N, T, D_out]: the attention output through ``attn.to_out[0]``
    """Attention of each entry's tokens (all its patches) against its keys, one call per group,
    followed by the output projection. With several groups each group's output is projected
    straight into its rows of the result, which spares joining the groups with a copy."""
    t, inner = query.shape[1:]
    proj = attn.to_out[0]
    # With several groups and a plain Linear (not a subclass such as a LoRA layer, whose forward
    # does more). Patched forwards run without autograd (``PatchedModel.forward_batch``), which
    # the out= products need.
    linear = proj if len(ctx.groups) > 1 and type(proj) is nn.Linear else None
    outs = []
    joined = (
        None if linear is None else query.new_empty(query.shape[0] * t, linear.out_features)
    )  # [N*T, D_out]
    for g in ctx.groups:
        rows = g.num_entries
        q = query[g.patch_start : g.patch_end].reshape(rows, g.patches_per_entry * t, inner)
        if per_entry_kv:
            k, v = key[g.entry_start : g.entry_end], value[g.entry_start : g.entry_end]
        else:
            k = key[g.patch_start : g.patch_end].reshape(rows, -1, key.shape[-1])
            v = value[g.patch_start : g.patch_end].reshape(rows, -1, value.shape[-1])
        qh, kh, vh = split_heads(q, attn.heads), split_heads(k, attn.heads), split_heads(v, attn.heads)
        if attn.norm_q is not None:
            qh = attn.norm_q(qh)
        if attn.norm_k is not None:
            kh = attn.norm_k(kh)
        o = merge_heads(F.scaled_dot_product_attention(qh, kh, vh)).to(query.dtype)  # [R_g, k*T, H*d]
        if joined is None or linear is None:
            outs.append(o.reshape(g.patch_end - g.patch_start, t, inner))
            continue
        block = joined[g.patch_start * t : g.patch_end * t]
        if linear.bias is None:
            torch.mm(o.reshape(-1, inner), linear.weight.t(), out=block)
        else:
            torch.addmm(linear.bias, o.reshape(-1, inner), linear.weight.t(), out=block)
    if joined is not None:
        return joined.view(query.shape[0], t, -1)
    with timed(ctx, "regroup"):
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
    return proj(out)


class PatchedAttnProcessor:
    """Replaces a U-Net ``Attention`` processor (self- or cross-attention)."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # [N, T, C] (or [N, C, p, p])
        encoder_hidden_states: torch.Tensor | None = None,  # [R, L, D] per entry
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        ctx = get_forward_context()
        if ctx is None:
            return self.original(
                attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs
            )
        if attention_mask is not None or attn.spatial_norm is not None:
            raise NotImplementedError("patched attention supports no attention masks or spatial norms")
        residual = hidden_states
        spatial = hidden_states.shape if hidden_states.dim() == 4 else None
        if spatial is not None:
            n, c, h, w = spatial
            hidden_states = hidden_states.reshape(n, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query = attn.to_q(hidden_states)
        cross = encoder_hidden_states is not None
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key, value = attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)
        if ctx.subset is not None:
            if not cross:
                key, value = refreshed_kv(attn, key, value, ctx)
            out = attn.to_out[0](
                partial_attention(attn, query, key, value, ctx, per_entry_kv=cross).to(query.dtype)
            )
        else:
            if not cross:
                ctx.recording((id(attn), "k"), key)
                ctx.recording((id(attn), "v"), value)
            out = grouped_attention(attn, query, key, value, ctx, per_entry_kv=cross)
        out = attn.to_out[1](out)
        if spatial is not None:
            out = out.transpose(1, 2).reshape(spatial)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class PatchedJointAttnProcessor:
    """Replaces SD3's joint attention: an entry's image tokens and its context attend together."""

    def __init__(self, original: Any) -> None:
        self.original = original

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,  # [N, T, D] image tokens per patch
        encoder_hidden_states: torch.Tensor | None = None,  # [R, L, D] context per entry
        attention_mask: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        ctx = get_forward_context()
        if ctx is None:
            return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)
        if attention_mask is not None:
            raise NotImplementedError("patched joint attention supports no attention masks")
        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        if ctx.subset is not None:
            k, v = refreshed_kv(attn, k, v, ctx)  # [N, T, H*d]: every patch, reused ones as cached
        else:
            ctx.recording((id(attn), "k"), k)
            ctx.recording((id(attn), "v"), v)
        if encoder_hidden_states is None:  # SD3.5's second, image-only attention
            if ctx.subset is not None:
                img = attn.to_out[0](partial_attention(attn, q, k, v, ctx, per_entry_kv=False))
            else:
                img = grouped_attention(attn, q, k, v, ctx, per_entry_kv=False)
            return attn.to_out[1](img)
        if ctx.subset is not None:
            img, ctx_out = partial_joint_groups(attn, q, k, v, encoder_hidden_states, ctx)
        else:
            img, ctx_out = _joint_groups(attn, q, k, v, encoder_hidden_states, ctx)
        img = attn.to_out[1](attn.to_out[0](img))
        if not attn.context_pre_only:
            ctx_out = attn.to_add_out(ctx_out)
        return img, ctx_out


def _joint_groups(
    attn: Attention,
    q: torch.Tensor,  # [N, T, H*d]
    k: torch.Tensor,
    v: torch.Tensor,
    context: torch.Tensor,  # [R, L, D]
    ctx: PatchContext,
) -> tuple[torch.Tensor, torch.Tensor]:  # image [N, T, H*d], context [R, L, H*d]
    heads = attn.heads
    cq = split_heads(attn.add_q_proj(context), heads)  # [R, H, L, d]
    ck = split_heads(attn.add_k_proj(context), heads)
    cv = split_heads(attn.add_v_proj(context), heads)
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    t, inner = q.shape[1:]
    img_outs, ctx_outs = [], []
    for g in ctx.groups:
        rows, tokens = g.num_entries, g.patches_per_entry * t
        sl, el = slice(g.patch_start, g.patch_end), slice(g.entry_start, g.entry_end)
        qi, ki, vi = (split_heads(x[sl].reshape(rows, tokens, inner), heads) for x in (q, k, v))
        if attn.norm_q is not None:
            qi = attn.norm_q(qi)
        if attn.norm_k is not None:
            ki = attn.norm_k(ki)
        o = F.scaled_dot_product_attention(
            torch.cat([qi, cq[el]], dim=2), torch.cat([ki, ck[el]], dim=2), torch.cat([vi, cv[el]], dim=2)
        )
        o = merge_heads(o)  # [R_g, tokens + L, H*d]
        img_outs.append(o[:, :tokens].reshape(g.patch_end - g.patch_start, t, inner))
        ctx_outs.append(o[:, tokens:])
    with timed(ctx, "regroup"):
        img = torch.cat(img_outs) if len(img_outs) > 1 else img_outs[0]
        context_out = torch.cat(ctx_outs) if len(ctx_outs) > 1 else ctx_outs[0]
    return img, context_out
