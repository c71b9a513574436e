"""The ``patchedserve models`` subcommand: lists the built-in models. Registered by `patchedserve.cli`."""

from __future__ import annotations

import argparse
from typing import Any

from patchedserve.models.names import DEFAULT_MODEL


def add_parser(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the built-in models",
        description="List the built-in models. Any local diffusers folder also works as --model PATH.",
    )
    parser.set_defaults(handler=run_models)


def run_models(args: argparse.Namespace) -> int:
    import torch

    from patchedserve.models.builtin import BUILTIN_MODELS

    print(f"{'name':<11} {'family':<6} {'size':>9} {'steps':>5} {'guidance':>8}  sampler     description")
    for name, entry in BUILTIN_MODELS.items():
        with torch.device("meta"):  # shapes and defaults only: the full-size models would take GBs
            bundle = entry.build()
        d = bundle.defaults
        mark = " (default)" if name == DEFAULT_MODEL else ""
        print(
            f"{name:<11} {bundle.family:<6} {d.width:>4}x{d.height:<4} {d.steps:>5} {d.guidance_scale:>8g}"
            f"  {bundle.default_sampler:<11} {entry.description}{mark}"
        )
    print("Any local diffusers folder (with model_index.json) also works: --model PATH")
    return 0
