"""Swaps a module's forward for a patch-aware one, in place, without touching its weights.

The replacement is stored on the instance (like diffusers' hooks), so parameter names, state
dicts and ``from_pretrained``/``save_pretrained`` are unaffected, and :func:`remove_patched_forward`
restores the original. Patched forwards fall back to the original when no forward context is
active. Used by ``PatchedModel`` when it wraps a model.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

_ORIGINAL = "_patchedserve_original_forward"

PatchedForward = Callable[..., Any]


def set_patched_forward(module: nn.Module, patched: PatchedForward) -> None:
    """Make ``module(...)`` call ``patched(original_forward, *args, **kwargs)``."""
    original = getattr(module, _ORIGINAL, None) or module.forward
    setattr(module, _ORIGINAL, original)

    def forward(*args: Any, **kwargs: Any) -> Any:
        return patched(original, *args, **kwargs)

    module.forward = forward


def is_patched(module: nn.Module) -> bool:
    return hasattr(module, _ORIGINAL)


def remove_patched_forward(module: nn.Module) -> None:
    original = getattr(module, _ORIGINAL, None)
    if original is not None:
        module.forward = original
        delattr(module, _ORIGINAL)
