"""Exactness figures of the patched path against each model's own full-image forward.

For each built-in family and patch size (smallest legal and larger), runs random mixes of 1-6
requests with random non-square sizes, timesteps and text states, and reports the worst relative
error (max |patched - full| / max |full|) and the lowest PSNR over all requests. Writes JSON.

    .venv/bin/python scripts/exactness_report.py --mixes 20 --json outputs/exactness.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from test_patch_exact import LARGER, make_request, patched, rel_err, run_full, run_patched


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    mse = float((out - ref).square().mean())
    peak = float(ref.abs().max())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mixes", type=int, default=20)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rng = random.Random(0)
    report = []
    for name in ("tiny-sd15", "tiny-sdxl", "tiny-sd3"):
        for scale in (1, LARGER[name]):
            pm = patched(name, scale)
            worst, low, count = 0.0, math.inf, 0
            for m in range(args.mixes):
                grids = [(rng.randint(1, 3), rng.randint(1, 3)) for _ in range(rng.randint(1, 6))]
                reqs = [make_request(pm, g, 1000 * m + i) for i, g in enumerate(grids)]
                for r, out in zip(reqs, run_patched(pm, reqs), strict=True):
                    ref = run_full(pm, r)
                    worst, low, count = max(worst, rel_err(out, ref)), min(low, psnr(out, ref)), count + 1
            row = {
                "model": name,
                "patch_px": pm.patch_size,
                "requests": count,
                "max_rel_err": worst,
                "min_psnr_db": low,
            }
            print(row, flush=True)
            report.append(row)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
