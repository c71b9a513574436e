"""Count the aten operators one patched step dispatches: a machine-independent cost of the patched path.

On a small model on a CPU every operator costs a few microseconds of dispatch whatever its size,
so the count shows overhead that timings on a shared machine blur. Prints, per mix, the operators
of one ``PatchedModel.forward_batch`` and of the model's own forward of one image.

    .venv/bin/python scripts/count_step_ops.py --model tiny-sdxl
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from patchedserve.bench.step import full_forward, mix_batch, random_mix
from patchedserve.models import load_model
from patchedserve.patch import PatchedModel


class Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def count(fn: Any) -> int:
    with torch.no_grad():
        fn()  # warm: contexts and halo indices are built once per composition
        with Counter() as counter:
            fn()
    return counter.count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-sdxl")
    ap.add_argument("--patch-size", type=int, default=256)
    args = ap.parse_args()
    bundle = load_model(args.model)
    pm = PatchedModel(
        bundle.denoiser, patch_size=args.patch_size, vae_scale_factor=bundle.vae_scale_factor, streams=1
    )  # one stream: the dispatch mode sees this thread's operators only
    mixes = {
        "8 x 256x256": [(256, 256)] * 8,
        "2 x (256x256, 512x256, 512x512)": [(256, 256), (256, 512), (512, 512)] * 2,
        "2 x 512x512 + 2 x 256x256": [(512, 512)] * 2 + [(256, 256)] * 2,
    }
    for name, sizes in mixes.items():
        mix = random_mix(pm, sizes, torch.device("cpu"), torch.float32)
        batch = mix_batch(pm, mix)
        layout = batch.layout
        patched = count(lambda b=batch: pm.forward_batch(b))
        own = count(lambda m=mix: full_forward(pm, m, [0]))
        print(
            f"{name} ({layout.num_patches} patches): patched step {patched} ops; "
            f"model's own forward, one image: {own}"
        )


if __name__ == "__main__":
    main()
