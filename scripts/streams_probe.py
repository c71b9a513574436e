"""CPU streams: engine steps with one stream against two, side by side in one process.

Times real engine steps (``DenoiseBatch`` for patched execution, ``ImageBatch`` for the
image-level baselines; CFG 5, both branches, as in ``bench slo``) of a few request mixes, with
``streams=1`` (one call on all threads) and ``streams=2`` (two parts side by side, one thread each
on two threads), alternating per repeat so that a change of the machine's load lands on both.
With ``--decode`` a VAE decode of a 512x512 image runs in a loop on another thread meanwhile, as
the engine's decode worker does under load. Prints the median step time of each and the ratio.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/streams_probe.py [--decode]

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import threading

import torch

from patchedserve.cluster.calibrate import Calibration, _requests, timed_step
from patchedserve.engine.batch import DenoiseBatch
from patchedserve.engine.image_batch import ImageBatch
from patchedserve.engine.prepare import Preparer
from patchedserve.models import decode_latents, load_model
from patchedserve.patch import PatchedModel

S, M, L = (256, 256), (512, 256), (512, 512)  # (width, height)
MIXES: dict[str, list[tuple[int, int]]] = {
    "1 x 256x256": [S],
    "1 x 512x512": [L],
    "3 x 512x256": [M] * 3,
    "4 x 512x512": [L] * 4,
    "256x256 + 512x256 + 512x512": [S, M, L],
    "256x256 + 2 x 512x256 + 2 x 512x512": [S, M, M, L, L],
    "2 x 256x256 + 3 x 512x256 + 3 x 512x512": [S, S, M, M, M, L, L, L],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="steps timed per variant and repeat")
    ap.add_argument("--rounds", type=int, default=3, help="alternations of the two stream counts")
    ap.add_argument("--decode", action="store_true", help="decode 512x512 images on another thread meanwhile")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bundle = load_model("tiny-sdxl")
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    config = Calibration(guidance_scale=5.0)
    models = {n: PatchedModel(bundle.denoiser, 256, bundle.vae_scale_factor, streams=n) for n in (1, 2)}
    stop = threading.Event()

    def decode_loop() -> None:
        latents = torch.randn(1, bundle.latent_channels, 64, 64)  # [1, C, h, w]
        while not stop.is_set():
            decode_latents(bundle, latents)

    decoder = threading.Thread(target=decode_loop, daemon=True)
    if args.decode:
        decoder.start()
    print(f"threads {args.threads}, decode thread {'on' if args.decode else 'off'}; median step ms")
    print(f"{'mix':42s} {'execution':9s} {'1 stream':>9s} {'2 streams':>9s} {'ratio':>6s}")
    try:
        for name, sizes in MIXES.items():
            for execution in ("patched", "image"):
                times: dict[int, list[float]] = {1: [], 2: []}
                for _ in range(args.rounds):
                    for n in (1, 2):
                        requests = _requests(bundle, sizes, config, steps=args.repeats + 1)
                        preparer.prepare(requests)
                        batch = (
                            DenoiseBatch(models[n], preparer.samplers, bundle.device)
                            if execution == "patched"
                            else ImageBatch(bundle, preparer.samplers, bundle.device, streams=n)
                        )
                        batch.sync(requests)
                        timed_step(bundle, batch)  # warm-up (layout, contexts)
                        times[n] += [timed_step(bundle, batch) for _ in range(args.repeats)]
                one, two = (statistics.median(times[n]) * 1000 for n in (1, 2))
                print(f"{name:42s} {execution:9s} {one:9.1f} {two:9.1f} {two / one:6.2f}", flush=True)
    finally:
        stop.set()
        if args.decode:
            decoder.join()


if __name__ == "__main__":
    main()
