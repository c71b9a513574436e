"""How OpenMP's wait policy changes a denoising step on this CPU, with and without a decode thread.

The CLI sets ``OMP_WAIT_POLICY=PASSIVE`` unless the environment already names a policy
(``patchedserve.cli``). Run this once per policy, each in a fresh process (the policy is read when
torch loads), e.g.

    for p in PASSIVE ACTIVE ""; do OMP_WAIT_POLICY=$p .venv/bin/python scripts/omp_wait_probe.py; done

(an empty value makes libgomp warn and keep its default: spin a while, then sleep, spinning less
when threads outnumber cores). Prints the mean time of a small step (tiny-sdxl, 256x256, the two
CFG branches) and a large one (8 x 512x512), alone and while another thread decodes 512x512
latents in a loop, as the engine's decode worker does. A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from collections.abc import Callable

import torch

from patchedserve.models import (
    denoiser_forward,
    encode_prompts,
    load_model,
    sdxl_time_ids,
    stack_conditioning,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("tiny-sdxl")
    embeds, pooled = stack_conditioning(encode_prompts(bundle, ["a photo of a cat"]))

    def step(batch: int, side_px: int) -> None:
        latent = side_px // bundle.vae_scale_factor
        x = torch.randn(batch, bundle.latent_channels, latent, latent)
        time_ids = torch.stack([sdxl_time_ids(bundle, side_px, side_px)] * batch)
        t = torch.full((batch,), 500.0)
        denoiser_forward(bundle, x, t, embeds.expand(batch, -1, -1), pooled.expand(batch, -1), time_ids)

    def mean_ms(fn: Callable[[], None], repeats: int) -> float:
        with torch.inference_mode():
            fn()  # warm-up
            start = time.perf_counter()
            for _ in range(repeats):
                fn()
        return (time.perf_counter() - start) / repeats * 1000

    def both() -> tuple[float, float]:
        return mean_ms(lambda: step(2, 256), args.repeats), mean_ms(lambda: step(8, 512), 3)

    alone = both()
    stop = threading.Event()

    def decoder() -> None:
        latents = torch.randn(1, bundle.latent_channels, 64, 64)
        with torch.inference_mode():
            while not stop.is_set():
                bundle.vae.decode(latents / bundle.vae.config.scaling_factor)

    worker = threading.Thread(target=decoder)
    worker.start()
    time.sleep(0.5)
    try:
        busy = both()
    finally:
        stop.set()
        worker.join()
    policy = os.environ.get("OMP_WAIT_POLICY", "(unset)") or "(empty: libgomp default)"
    print(
        f"OMP_WAIT_POLICY={policy}: small step {alone[0]:.1f} ms, large {alone[1]:.1f} ms; "
        f"with a decode thread: small {busy[0]:.1f} ms, large {busy[1]:.1f} ms"
    )


if __name__ == "__main__":
    main()
