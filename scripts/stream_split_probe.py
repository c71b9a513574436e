"""How a patched step is shared out over two CPU streams: contiguous cuts against ``patch.partition``.

Default: times engine steps (``DenoiseBatch``, CFG 5, tiny-sdxl, patch 256) of random request mixes
with the parts cut as contiguous runs of about equal patch counts (what the engine did before
``patch.partition``) and as ``stream_parts`` splits them, alternating per mix so that a change of
the machine's load lands on both. Prints the summed step time of each, overall and by the number
of resolutions in the step.

``--fit``: times ``PatchedModel.forward_batch`` on one thread over random mixes of entries (one
part of a step) while another thread runs a mixed batch beside it, as the other stream does, and
fits ``PartCost``'s terms by least squares, in milliseconds.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python scripts/stream_split_probe.py [--mixes 80] [--fit]

A benchmark, not a test.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import statistics
import threading
import time

import numpy as np
import torch

import patchedserve.patch.model as patch_model
from patchedserve.cluster.calibrate import Calibration, _requests
from patchedserve.engine.batch import DenoiseBatch
from patchedserve.engine.prepare import Preparer
from patchedserve.layout import CSPLayout
from patchedserve.models import ModelBundle, load_model
from patchedserve.patch import PatchedModel
from patchedserve.patch.partition import stream_parts
from patchedserve.scheduler.profile import BatchMaker
from patchedserve.streams import balanced_cuts

SIZES = [(256, 256), (512, 256), (512, 512)]  # (width, height)


def contiguous_parts(layout: CSPLayout, streams: int) -> list[list[int]]:
    counts = np.diff(layout.entry_offsets).tolist()
    return [list(range(a, b)) for a, b in balanced_cuts(counts, streams)]


def compare(bundle: ModelBundle, mixes: int, seed: int) -> None:
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    pm = PatchedModel(bundle.denoiser, 256, bundle.vae_scale_factor, streams=2)
    rng = random.Random(seed)
    rules = {"contiguous": contiguous_parts, "partition": stream_parts}
    totals: dict[tuple[str, int], float] = collections.defaultdict(float)
    for _ in range(mixes):
        sizes = [rng.choice(SIZES) for _ in range(rng.randint(2, 8))]
        requests = _requests(bundle, sizes, Calibration(guidance_scale=5.0), steps=12)
        preparer.prepare(requests)
        batch = DenoiseBatch(pm, preparer.samplers, bundle.device)
        batch.sync(requests)
        batch.step()  # warm-up: layout and contexts
        resolutions = len(set(sizes))
        for name in ("contiguous", "partition", "partition", "contiguous"):
            patch_model.stream_parts = rules[name]  # type: ignore[attr-defined]
            start = time.perf_counter()
            batch.step()
            elapsed = time.perf_counter() - start
            totals[(name, resolutions)] += elapsed
            totals[(name, 0)] += elapsed
    patch_model.stream_parts = stream_parts  # type: ignore[attr-defined]
    print(f"{mixes} mixes of 2-8 requests, two steps of each split rule per mix; summed seconds")
    for resolutions in sorted({r for _, r in totals}):
        a, b = totals[("contiguous", resolutions)], totals[("partition", resolutions)]
        label = "all" if resolutions == 0 else f"{resolutions} resolution(s)"
        print(f"{label:16s} contiguous {a:7.3f}  partition {b:7.3f}  partition / contiguous {b / a:.3f}")


def fit(bundle: ModelBundle, mixes: int, seed: int) -> None:
    torch.set_num_threads(1)
    pm = PatchedModel(bundle.denoiser, 256, bundle.vae_scale_factor, streams=1)
    make = BatchMaker(bundle, pm, seed)
    counts = [c for c in itertools.product(range(7), repeat=3) if 1 <= sum(c) <= 12]
    counts = [c for c in counts if c[0] + 2 * c[1] + 4 * c[2] <= 36]
    random.Random(seed).shuffle(counts)
    counts = counts[:mixes]
    batches = [
        make([(*size, False) for size, k in zip(SIZES, c, strict=True) for _ in range(k)]) for c in counts
    ]
    times: list[list[float]] = [[] for _ in counts]
    beside = make([(*size, False) for size in SIZES for _ in range(2)])
    stop = threading.Event()

    def other_stream() -> None:
        torch.set_num_threads(1)
        while not stop.is_set():
            pm.forward_batch(beside)

    worker = threading.Thread(target=other_stream, daemon=True)
    worker.start()
    try:
        for b in batches:
            pm.forward_batch(b)
        for _ in range(3):
            for i, b in enumerate(batches):
                start = time.perf_counter()
                pm.forward_batch(b)
                times[i].append(time.perf_counter() - start)
    finally:
        stop.set()
        worker.join()
    rows, ys = [], []
    for c, t in zip(counts, times, strict=True):
        patches = [1, 2, 4]
        present = sum(k > 0 for k in c)
        rows.append(
            [
                1.0,
                sum(k * p for k, p in zip(c, patches, strict=True)),
                sum(k * p * p for k, p in zip(c, patches, strict=True)),
                present - 1,
                float(present == 1),
            ]
        )
        ys.append(statistics.median(t) * 1000)
    x, y = np.array(rows), np.array(ys)
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    error = float(np.mean(np.abs(x @ coef - y) / y))
    names = ["fixed", "per patch", "per squared entry patches", "per extra resolution", "one resolution"]
    print(f"{len(counts)} mixes, one thread; ms (mean error {100 * error:.1f}%):")
    for name, value in zip(names, coef, strict=True):
        print(f"  {name:26s} {value:8.2f}   {value / coef[1]:6.3f} patches")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", type=int, default=80, help="mixes to time (at most 70 with --fit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--fit", action="store_true", help="fit PartCost on one-thread parts instead")
    args = ap.parse_args()
    torch.set_num_threads(2)
    bundle = load_model("tiny-sdxl")
    if args.fit:
        fit(bundle, min(args.mixes, 70), args.seed)
    else:
        compare(bundle, args.mixes, args.seed)


if __name__ == "__main__":
    main()
