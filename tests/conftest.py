"""Shared fixtures: built-in models written once per session as diffusers folders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

# The test models are tiny: a second thread costs more in synchronisation than it saves, and on a
# shared 2-core machine spinning OpenMP threads of concurrent runs stall each other (10-50x slower).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Returns a function: built-in name -> a folder written by `ModelBundle.save_pretrained`."""
    from patchedserve.models import load_model

    folders: dict[str, Path] = {}

    def save(name: str) -> Path:
        if name not in folders:
            folders[name] = load_model(name).save_pretrained(tmp_path_factory.mktemp(name))
        return folders[name]

    return save
