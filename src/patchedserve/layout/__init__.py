"""Patch layout: the Compressed Sparse Patch (CSP) batch that all patched execution works on."""

from patchedserve.layout.csp import AttentionGroup, CSPLayout, merge_patches, split_latents

__all__ = ["AttentionGroup", "CSPLayout", "merge_patches", "split_latents"]
