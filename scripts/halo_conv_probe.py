"""What a 3x3 conv's halo costs: one conv over halo-padded patches against one over whole images.

For each U-Net level of tiny-sdxl at 256 px patches (channels 32/64/64, patch sides 32/16/8
latent pixels), times ``F.conv2d`` on the 8 halo-padded patches of one 512x512 request with CFG
(two rows of 2x2 patches) against the same conv on the two whole 64x64 / 32x32 / 16x16 images with
zero padding. Both produce the same output pixels; the patches read 13-56% more input. Median of
``--repeats`` calls each, channels-last, float32.

    .venv/bin/python scripts/halo_conv_probe.py --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

LEVELS = ((32, 32), (64, 16), (64, 8))
"""(channels, patch side in latent pixels) per level of tiny-sdxl at 256 px patches."""


def median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cl = torch.channels_last
    for channels, side in LEVELS:
        weight = torch.randn(channels, channels, 3, 3).contiguous(memory_format=cl)
        patches = torch.randn(8, channels, side + 2, side + 2).contiguous(
            memory_format=cl
        )  # [8, C, p+2, p+2]
        images = torch.randn(2, channels, 2 * side, 2 * side).contiguous(memory_format=cl)  # [2, C, 2p, 2p]
        patched = median_ms(lambda w=weight, x=patches: F.conv2d(x, w, None, 1, 0), args.repeats)
        whole = median_ms(lambda w=weight, x=images: F.conv2d(x, w, None, 1, 1), args.repeats)
        extra = (side + 2) ** 2 / side**2 - 1
        print(
            f"C={channels} patch side {side}: halo patches {patched:.3f} ms, whole images {whole:.3f} ms, "
            f"ratio {patched / whole:.2f} (halo adds {extra:.0%} of input pixels)"
        )


if __name__ == "__main__":
    main()
