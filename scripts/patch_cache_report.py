"""Patch-level block cache: reuse, speed and image quality against the exact engine, side by side.

Runs the same requests through one engine per setting (exact, then each threshold and
granularity), all submitted at once so they share batches, and reports per setting: the share of
patch-block computations reused, the wall time as a ratio to the exact engine measured in the same
run ("together"), the PSNR of every finished image against the exact engine's image of the same
request, and the cached / exact denoising time when requests join one per step and leave when done,
as a serving engine sees them ("served", ``cluster.calibrate.measure_patch_cache_factor``).

    .venv/bin/python scripts/patch_cache_report.py --model tiny-sdxl --thresholds 0.02,0.05,0.1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from patchedserve import Engine, GenerationRequest
from patchedserve.bench.prompts import PROMPTS
from patchedserve.engine import EngineConfig
from patchedserve.models import load_model
from patchedserve.patch import PatchCacheConfig


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def run(model: str, reqs: list[GenerationRequest], cache: PatchCacheConfig | None, patch: int, repeats: int):
    engine = Engine(
        load_model(model), EngineConfig(patch_size=patch, patch_cache=cache, decode_in_thread=False)
    )
    engine.generate(reqs[:1])  # warm-up
    best, images = float("inf"), []
    for _ in range(repeats):
        if engine.model.cache is not None:
            engine.model.cache.stats.patch_blocks = engine.model.cache.stats.reused = 0
        start = time.perf_counter()
        results = engine.generate(reqs)
        best = min(best, time.perf_counter() - start)
        images = [np.asarray(r.image) for r in results]
    cache = engine.model.cache
    reuse = cache.stats.reuse_fraction if cache is not None else 0.0
    if cache is not None:
        print(
            f"threshold {cache.config.threshold:g}: cache holds {cache.nbytes() / 2**20:.1f} MiB "
            f"for the last batch of {len(reqs)} requests"
        )
    return best, images, reuse


def run_nirvana(model: str, reqs: list[GenerationRequest], patch: int) -> tuple[list[float], float]:
    """PSNR of the NIRVANA baseline's images against the same engine without its cache, requests
    arriving one after another (so the cache fills); and the share that started from a cached
    latent. Requests that did not hit are bit-identical (infinite PSNR) and left out."""
    scores = []
    engines = [
        Engine(
            load_model(model),
            EngineConfig(
                patch_size=patch,
                execution="image",
                policy="res-fcfs",
                approx_cache=cache,
                decode_in_thread=False,
            ),
        )
        for cache in (True, False)
    ]
    for g in reqs:
        approx, exact = (np.asarray(e.generate([g])[0].image) for e in engines)
        scores.append(psnr(approx, exact))
    cache = engines[0].approx_cache
    assert cache is not None
    return [s for s in scores if s != float("inf")], cache.hits / max(cache.lookups, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="tiny-sdxl")
    ap.add_argument("--thresholds", default="0.01,0.05,0.1")
    ap.add_argument("--max-reuse", type=int, default=2)
    ap.add_argument("--granularities", default="image,patch")
    ap.add_argument("--sizes", default="256x256,512x256,512x512")
    ap.add_argument("--count", type=int, default=6, help="requests (sizes cycle)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--patch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2, help="timed repeats per setting (best is kept)")
    ap.add_argument("--nirvana", action="store_true", help="also score the NIRVANA baseline's images")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    reqs = [
        GenerationRequest(
            PROMPTS[i % len(PROMPTS)],
            width=sizes[i % len(sizes)][0],
            height=sizes[i % len(sizes)][1],
            steps=args.steps,
            seed=i,
        )
        for i in range(args.count)
    ]
    exact_s, exact_images, _ = run(args.model, reqs, None, args.patch_size, args.repeats)
    rows = [{"threshold": None, "reuse": 0.0, "time_s": exact_s, "speedup": 1.0, "psnr_min": None}]
    from patchedserve.cluster.calibrate import Calibration, measure_patch_cache_factor
    from patchedserve.engine.prepare import Preparer

    bundle = load_model(args.model)
    preparer = Preparer(bundle, bundle.device, bundle.dtype)
    calibration = Calibration(sizes=tuple(sizes), patch_size=args.patch_size, steps=args.steps)  # type: ignore[arg-type]
    for granularity in args.granularities.split(","):
        for th in (float(t) for t in args.thresholds.split(",")):
            cfg = PatchCacheConfig(threshold=th, max_reuse=args.max_reuse, granularity=granularity)
            t_s, images, reuse = run(args.model, reqs, cfg, args.patch_size, args.repeats)
            served, _ = measure_patch_cache_factor(bundle, preparer, calibration, cfg)
            scores = [psnr(a, b) for a, b in zip(images, exact_images, strict=True)]
            rows.append(
                {
                    "threshold": th,
                    "granularity": granularity,
                    "reuse": reuse,
                    "time_s": t_s,
                    "speedup": exact_s / t_s,
                    "served_factor": served,
                    "psnr_min": min(scores),
                    "psnr_mean": float(np.mean([min(s, 100) for s in scores])),
                }
            )
    if args.nirvana:
        hit_scores, hits = run_nirvana(args.model, reqs, args.patch_size)
        print(
            f"nirvana: {hits:.0%} of requests started from a cached latent; PSNR of those against "
            f"exact: min {min(hit_scores, default=float('nan')):.1f}, mean "
            f"{float(np.mean(hit_scores)) if hit_scores else float('nan'):.1f} dB"
        )
        rows.append({"system": "nirvana", "hit_rate": hits, "psnr_hits": hit_scores})
    print(
        f"{'setting':>12} {'reuse':>6} {'time s':>7} {'together':>8} {'served':>6} "
        f"{'PSNR min':>8} {'mean':>6}"
    )
    for r in rows:
        if "threshold" not in r:
            continue
        th = "exact" if r["threshold"] is None else f"{r['granularity']} {r['threshold']:g}"
        pm = "-" if r["psnr_min"] is None else f"{r['psnr_min']:.1f}"
        mean = "-" if r["psnr_min"] is None else f"{r['psnr_mean']:.1f}"
        served = f"{1 / r['served_factor']:.2f}" if "served_factor" in r else "1.00"
        print(
            f"{th:>12} {r['reuse']:6.1%} {r['time_s']:7.2f} {r['speedup']:8.2f} {served:>6} {pm:>8} {mean:>6}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
