"""Convolution weight layout: contiguous (NCHW) against channels-last, side by side in one process.

``load_model`` lays the denoiser's and the VAE's convolution weights out channels-last
(``ModelBundle.channels_last``). This times, with each layout in turn (twice, alternating, so a
change of the machine's load lands on both), the best of three means of:

* a patched step of a mix of three resolutions (``PatchedModel.forward_batch``);
* a model-forward step of two same-size images (256x256 and 512x512, the one-resolution path);
* a VAE decode of one 256x256 and one 512x512 image (``decode_latents``, as the engine's worker).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/layout_probe.py

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from patchedserve.bench.step import mix_batch, random_mix
from patchedserve.models import decode_latents, load_model
from patchedserve.patch import PatchedModel

MIXES: dict[str, list[tuple[int, int]]] = {
    "patched 256x256+512x256+512x512": [(256, 256), (512, 256), (512, 512)],
    "forward 2 x 256x256": [(256, 256)] * 2,
    "forward 2 x 512x512": [(512, 512)] * 2,
}


def best_mean_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        best = min(best, (time.perf_counter() - start) / repeats * 1000)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("tiny-sdxl")
    model = PatchedModel(bundle.denoiser, 256, bundle.vae_scale_factor)  # one-size mixes: model forward
    cases: dict[str, Callable[[], object]] = {}
    for name, sizes in MIXES.items():
        batch = mix_batch(model, random_mix(model, sizes, torch.device("cpu"), torch.float32))
        cases[name] = lambda batch=batch: model.forward_batch(batch)
    for side in (32, 64):
        latents = torch.randn(1, bundle.latent_channels, side, side)  # [1, C, h, w]
        cases[f"decode {side * 8}x{side * 8}"] = lambda latents=latents: decode_latents(bundle, latents)
    times: dict[str, dict[str, list[float]]] = {name: {"nchw": [], "channels-last": []} for name in cases}
    with torch.inference_mode():
        for _ in range(2):
            for label, fmt in (("nchw", torch.contiguous_format), ("channels-last", torch.channels_last)):
                bundle.denoiser.to(memory_format=fmt)
                bundle.vae.to(memory_format=fmt)
                for name, fn in cases.items():
                    times[name][label].append(best_mean_ms(fn, 3))
    for name, by in times.items():
        rounds = zip(by["nchw"], by["channels-last"], strict=True)
        pairs = "  ".join(f"{a:6.1f} -> {b:6.1f} ms ({b / a:.2f})" for a, b in rounds)
        print(f"{name:34s} nchw -> channels-last: {pairs}")


if __name__ == "__main__":
    main()
