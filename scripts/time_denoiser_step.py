"""Times one denoising step (one denoiser forward, batch 1, no CFG) of each built-in model.

Usage: .venv/bin/python scripts/time_denoiser_step.py [--sizes 512 1024] [--repeats 5] [--threads N]
Prints a table and writes the medians to outputs/denoiser_step.json. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from patchedserve.models import (
    BUILTIN_MODELS,
    denoiser_forward,
    encode_prompts,
    load_model,
    sdxl_time_ids,
    stack_conditioning,
)


def time_step(name: str, side: int, repeats: int) -> float:
    """Median seconds of one batch-1 denoiser forward at side x side pixels (after one warm-up)."""
    bundle = load_model(name)
    embeds, pooled = stack_conditioning(encode_prompts(bundle, ["a photo of a cat"]))
    latent = side // bundle.vae_scale_factor
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, bundle.latent_channels, latent, latent, generator=g)
    time_ids = sdxl_time_ids(bundle, side, side)[None] if bundle.family == "sdxl" else None
    timestep = torch.tensor([500.0])
    times = []
    with torch.inference_mode():
        for _ in range(repeats + 1):
            start = time.perf_counter()
            denoiser_forward(bundle, sample, timestep, embeds, pooled, time_ids)
            times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path("outputs/denoiser_step.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in BUILTIN_MODELS:
        for side in args.sizes:
            step_s = time_step(name, side, args.repeats)
            threads = torch.get_num_threads()
            rows.append({"model": name, "size_px": side, "step_s": step_s, "threads": threads})
            print(f"{name:<10} {side:>5}x{side:<5} {step_s * 1000:8.1f} ms/step  ({threads} threads)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
