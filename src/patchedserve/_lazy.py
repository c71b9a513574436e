"""Lazy package exports: a package's names load from their modules on first use.

A package ``__init__`` that imports its modules eagerly makes every import of any of its modules
(even a constant's) load torch and diffusers, about 8 s on a 2-core machine; the CLI builds its
whole parser from such imports. A package that uses :func:`lazy_exports` instead names its exports
under ``TYPE_CHECKING`` (for type checkers) and in one table (for the interpreter):

    if TYPE_CHECKING:
        from patchedserve.models.loading import load_model as load_model
    __getattr__ = lazy_exports(__name__, {"load_model": "loading"})
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, modules: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``modules`` maps each exported name to the module
    (relative to the package) that defines it. The name is imported on first access and then kept
    in the package, so later accesses are plain attribute reads."""

    def load(name: str) -> Any:
        module = modules.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    return load
