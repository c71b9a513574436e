"""SD3-specific patched operators: positional embedding per patch, per-entry context stream.

* ``PatchEmbed``: the 2x2 projection is patch-local; each token then gets the positional
  embedding of its absolute position in its own image, i.e. the same centre crop of the
  ``pos_embed_max_size`` grid that the model uses for the full image, gathered per patch.
* Context-stream norms (``norm1_context``): the text/context stream travels once per entry
  ``[R, L, D]`` while the image stream travels per patch ``[N, T, D]``; the context norm takes the
  conditioning embedding of each entry's first patch (all patches of an entry share it).

Installed by ``PatchedModel``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.models.embeddings import PatchEmbed
from torch import nn

from patchedserve.patch.context import PatchContext, get_forward_context
from patchedserve.patch.hooks import set_patched_forward


def _position_index(embed: PatchEmbed, ctx: PatchContext, tokens_per_side: int) -> torch.Tensor:
    """[N, t*t] long: row of ``pos_embed`` for every token of every patch."""
    layout, ps = ctx.layout, embed.patch_size
    m = int(embed.pos_embed_max_size or 0)
    sizes = np.array(layout.sizes, dtype=np.int64)[layout.patch_entry]  # [N, 2] latent px
    top = (m - sizes[:, 0] // ps) // 2
    left = (m - sizes[:, 1] // ps) // 2
    local = np.arange(tokens_per_side)
    rows = (top + layout.patch_row * tokens_per_side)[:, None] + local[None, :]  # [N, t]
    cols = (left + layout.patch_col * tokens_per_side)[:, None] + local[None, :]
    index = rows[:, :, None] * m + cols[:, None, :]  # [N, t, t]
    return torch.as_tensor(index.reshape(len(index), -1), device=ctx.device)


def patch_pos_embed(embed: PatchEmbed) -> None:
    if embed.pos_embed_max_size is None or not embed.flatten:
        raise ValueError("patched SD3 execution needs PatchEmbed with pos_embed_max_size (as SD3 has)")

    def forward(original: Any, latent: torch.Tensor) -> torch.Tensor:  # [N, C, p, p] -> [N, T, D]
        ctx = get_forward_context()
        if ctx is None:
            return original(latent)
        tokens_per_side = latent.shape[-1] // embed.patch_size
        longest = max(max(s) for s in ctx.layout.sizes) // embed.patch_size
        if longest > embed.pos_embed_max_size:
            raise ValueError(
                f"image of {longest} tokens exceeds pos_embed_max_size {embed.pos_embed_max_size}"
            )
        x = embed.proj(latent).flatten(2).transpose(1, 2)  # [N, T, D]
        if embed.layer_norm:
            x = embed.norm(x)
        index = ctx.cached(f"sd3_pos_{id(embed)}", lambda: _position_index(embed, ctx, tokens_per_side))
        table: Any = embed.pos_embed
        pos = table[0].index_select(0, index.reshape(-1)).view(index.shape[0], index.shape[1], -1)
        return (x + pos).to(x.dtype)

    set_patched_forward(embed, forward)


def patch_context_norm(norm: nn.Module) -> None:
    """``norm(x [R, L, D], emb [N, E])``: use each entry's first-patch embedding instead."""

    def forward(original: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        ctx = get_forward_context()
        if ctx is not None and ctx.subset is not None and ctx.subset.entry_emb is not None:
            # patch cache: the block sees only active patches; the context stream needs every entry
            if "emb" in kwargs:
                kwargs["emb"] = ctx.subset.entry_emb  # [R, E]
            else:
                args = (ctx.subset.entry_emb, *args[1:])
        elif ctx is not None:
            if "emb" in kwargs:  # AdaLayerNormZero(x, emb=...)
                kwargs["emb"] = kwargs["emb"].index_select(0, ctx.entry_first_patch)  # [R, E]
            else:  # AdaLayerNormContinuous(x, conditioning_embedding)
                args = (args[0].index_select(0, ctx.entry_first_patch), *args[1:])
        return original(x, *args, **kwargs)

    set_patched_forward(norm, forward)
