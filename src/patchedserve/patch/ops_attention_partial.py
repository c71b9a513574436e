"""Attention for the patch cache's partial block calls (``granularity="patch"``), and the head
reshapes that ``ops_attention`` shares.

In a partial call only the *active* patches compute; reused patches' keys and values come from the
cache's site buffers (``refreshed_kv``). Each active patch's queries then attend over its whole
entry: one SDPA call per attention group over the active patches of that group, whose keys are their
entries' gathered keys. SD3's context tokens attend over every entry's full image as usual.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from patchedserve.patch.context import PatchContext


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:  # [B, L, H*d] -> [B, H, L, d]
    b, length, inner = x.shape
    return x.view(b, length, heads, inner // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:  # [B, H, L, d] -> [B, L, H*d]
    b, h, length, d = x.shape
    return x.transpose(1, 2).reshape(b, length, h * d)


def refreshed_kv(
    attn: Attention, key: torch.Tensor, value: torch.Tensor, ctx: PatchContext
) -> tuple[torch.Tensor, torch.Tensor]:  # [N, T, H*d] each
    """Keys and values of every patch: the active ones fresh ([A, T, H*d]), the others as cached."""
    assert ctx.subset is not None and ctx.cache is not None
    rows, out = ctx.subset.index, []
    for tag, fresh in (("k", key), ("v", value)):
        full = ctx.cache.site((id(attn), tag)).index_copy(0, rows, fresh)
        ctx.cache.record((id(attn), tag), full)
        out.append(full)
    return out[0], out[1]


def _group_rows(ctx: PatchContext) -> list[tuple[Any, int, int, torch.Tensor]]:
    """Per attention group with active patches: the group, the active range [lo, hi) and the
    group-local entry of each of those active patches."""
    active = ctx.subset
    assert active is not None
    out = []
    for g in ctx.groups:
        lo, hi = (int(i) for i in np.searchsorted(active.host, [g.patch_start, g.patch_end]))
        if lo < hi:
            out.append((g, lo, hi, active.entry[lo:hi] - g.entry_start))
    return out


def partial_attention(
    attn: Attention,
    query: torch.Tensor,  # [A, T, H*d] active patches
    key: torch.Tensor,  # [N, T, H*d] every patch, or [R, L, H*d] per entry when ``per_entry_kv``
    value: torch.Tensor,
    ctx: PatchContext,
    per_entry_kv: bool,
) -> torch.Tensor:  # [A, T, H*d]
    """Each active patch's queries against its whole entry's keys (one call per group)."""
    active = ctx.subset
    assert active is not None
    heads, t, inner = attn.heads, query.shape[1], query.shape[2]
    if per_entry_kv:
        k, v = key.index_select(0, active.entry), value.index_select(0, active.entry)  # [A, L, H*d]
        return merge_heads(
            _sdpa(attn, split_heads(query, heads), split_heads(k, heads), split_heads(v, heads))
        )
    out = query.new_empty(query.shape)
    for g, lo, hi, local in _group_rows(ctx):
        rows, tokens = g.num_entries, g.patches_per_entry * t
        kg = key[g.patch_start : g.patch_end].reshape(rows, tokens, -1).index_select(0, local)
        vg = value[g.patch_start : g.patch_end].reshape(rows, tokens, -1).index_select(0, local)
        o = _sdpa(attn, split_heads(query[lo:hi], heads), split_heads(kg, heads), split_heads(vg, heads))
        out[lo:hi] = merge_heads(o).to(out.dtype)
    return out.view(-1, t, inner)


def _sdpa(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return F.scaled_dot_product_attention(q, k, v)


def partial_joint_groups(
    attn: Attention,
    q: torch.Tensor,  # [A, T, H*d] active patches
    k: torch.Tensor,  # [N, T, H*d] every patch
    v: torch.Tensor,
    context: torch.Tensor,  # [R, L, D]
    ctx: PatchContext,
) -> tuple[torch.Tensor, torch.Tensor]:  # image [A, T, H*d], context [R, L, H*d]
    """SD3 joint attention when only some patches compute: every entry's context attends to all
    its image tokens (reused patches as cached); active patches' tokens attend likewise."""
    heads, t, inner = attn.heads, q.shape[1], q.shape[2]
    cq = split_heads(attn.add_q_proj(context), heads)  # [R, H, L, d]
    ck = split_heads(attn.add_k_proj(context), heads)
    cv = split_heads(attn.add_v_proj(context), heads)
    if attn.norm_added_q is not None:
        cq = attn.norm_added_q(cq)
    if attn.norm_added_k is not None:
        ck = attn.norm_added_k(ck)
    img = q.new_empty(q.shape)
    ctx_out = []
    rows_of = {id(g): (lo, hi, local) for g, lo, hi, local in _group_rows(ctx)}
    for g in ctx.groups:
        rows, tokens = g.num_entries, g.patches_per_entry * t
        el = slice(g.entry_start, g.entry_end)
        kg = split_heads(k[g.patch_start : g.patch_end].reshape(rows, tokens, inner), heads)
        vg = split_heads(v[g.patch_start : g.patch_end].reshape(rows, tokens, inner), heads)
        if attn.norm_k is not None:
            kg = attn.norm_k(kg)
        keys, values = torch.cat([kg, ck[el]], dim=2), torch.cat([vg, cv[el]], dim=2)  # [R_g, H, tokens+L, d]
        ctx_out.append(merge_heads(F.scaled_dot_product_attention(cq[el], keys, values)))
        if id(g) in rows_of:
            lo, hi, local = rows_of[id(g)]
            qi = split_heads(q[lo:hi], heads)
            if attn.norm_q is not None:
                qi = attn.norm_q(qi)
            o = F.scaled_dot_product_attention(qi, keys.index_select(0, local), values.index_select(0, local))
            img[lo:hi] = merge_heads(o).to(img.dtype)
    return img, torch.cat(ctx_out) if len(ctx_out) > 1 else ctx_out[0]
