"""The engine at full width against diffusers' own pipeline: one mixed batch of a full-size model.

Runs two requests of different sizes (one with a negative prompt, both with CFG) through the
engine's patched mixed-resolution batch, and each alone through the family's diffusers pipeline
(`reference.diffusers_generate`), and reports the largest pixel difference per request (the
tests' bound for the tiny models is 2/255). At SDXL's or SD3 medium's full widths on a CPU this
takes a few minutes and about 14 GB:

    .venv/bin/python scripts/fullsize_engine_check.py --model sdxl-arch --json outputs/fullsize_engine.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from patchedserve.engine import Engine
from patchedserve.models import load_model
from patchedserve.reference import diffusers_generate
from patchedserve.request import GenerationRequest, RequestStatus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sdxl-arch")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, ...; float32 with TF32 off")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    start = time.perf_counter()
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # float32 proper
    bundle = load_model(args.model).to(device=torch.device(args.device))
    sampler = bundle.default_sampler
    requests = [
        GenerationRequest(
            "a red fox in the snow", width=256, height=128, steps=args.steps, seed=1, sampler=sampler
        ),
        GenerationRequest(
            "a city street at night",
            negative_prompt="blurry",
            width=128,
            height=128,
            steps=args.steps,
            guidance_scale=4.0,
            seed=2,
            sampler=sampler,
        ),
    ]
    engine = Engine.from_model(bundle, patch_size=args.patch_size, decode_in_thread=False, device=args.device)
    try:
        results = engine.generate(requests)
    finally:
        engine.stop()
    rows = []
    for g, result in zip(requests, results, strict=True):
        assert result.status == RequestStatus.FINISHED and result.image is not None, result.error
        theirs = diffusers_generate(
            bundle,
            g.prompt,
            negative_prompt=g.negative_prompt,
            width=g.width,
            height=g.height,
            steps=g.steps,
            guidance_scale=g.guidance_scale,
            seed=g.seed,
            sampler=g.sampler,
        )
        ours_px, theirs_px = (np.asarray(im, dtype=np.int16) for im in (result.image, theirs))
        rows.append(
            {
                "size": f"{g.width}x{g.height}",
                "max_pixel_diff": int(np.abs(ours_px - theirs_px).max()),
                "image_std": float(theirs_px.std()),
            }
        )
        print(rows[-1], flush=True)
    report = {
        "model": args.model,
        "device": args.device,
        "steps": args.steps,
        "patch_size": args.patch_size,
        "requests": rows,
    }
    report["wall_s"] = time.perf_counter() - start
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
