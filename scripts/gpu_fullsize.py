"""The full-size layouts on a GPU: exactness at real widths, one step's cost, and the simulator's costs.

One process builds each model once (``sdxl-arch``, ``sd3-arch``: published widths, random weights)
and, within a time budget, in this order:

1. exactness: the patched step against the model's own full-image forward, per request, for a mix
   of 1024/768/512 px requests; float32 with TF32 off (the bar: float rounding), float32 with
   TF32 on (torch's cuDNN default), and float16 (against the float32 forward, with the model's own
   float16 forward beside it for scale);
2. step cost in float16: requests of 512/768/1024 px with CFG, as a plain pipeline runs them (one
   request per call, both CFG branches together), one call per resolution, and one patched call;
3. for the first model: ``patchedserve profile`` and the two cost files of ``bench calibrate``
   (smaller than the CLI's defaults, to fit the lease), for ``patchedserve simulate``;
4. with those files, a short real ``bench slo`` replay of the first model in float16, so that the
   simulator's GPU costs can be checked against the real engine on the same trace.

A stage that fails prints its traceback and the next one runs; every file is written as soon as
its stage ends, so a run cut short by the lease keeps what it finished.

Usage: ``python scripts/gpu_fullsize.py --out DIR [--models sdxl-arch,sd3-arch] [--budget-s 420]``.
On a CPU, ``--device cpu --exact-only --exact-sizes 512x512,512x256,256x256`` checks float32
exactness at full width (about a minute and 14 GB per model); ``--models tiny-sdxl`` runs every
stage at tiny widths.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from patchedserve.bench.step import Mix, full_forward, mix_batch, random_mix, time_call
from patchedserve.cli import main as cli_main
from patchedserve.cluster.calibrate import Calibration, calibrate_all
from patchedserve.layout import merge_patches
from patchedserve.models import load_model
from patchedserve.models.loading import unload_models
from patchedserve.patch import PatchedModel
from patchedserve.scheduler import LatencyPredictor

EXACT_SIZES = [(1024, 1024), (768, 768), (512, 512), (512, 768)]
"""(height, width) of the exactness mix, one request each, no CFG."""
STEP_MIXES = [1, 2, 4]
"""Requests of each of 512, 768 and 1024 px in the timed mixes (3, 6 and 12 requests)."""


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref|, in float64: the metric of tests/test_patch_exact.py."""
    a64, r64 = a.double(), ref.double()
    return float((a64 - r64).abs().max() / r64.abs().max())


@torch.no_grad()
def patched_and_full(pm: PatchedModel, mix: Mix) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each entry's output (in mix order) from one patched call and from its own full forward."""
    batch = mix_batch(pm, mix)
    merged = merge_patches(pm.forward_batch(batch), batch.layout)  # layout order, each [C, h, w]
    patched: list[torch.Tensor] = [torch.empty(0)] * len(mix.sizes)
    for k, entry in enumerate(batch.layout.entry_ids):
        patched[entry] = merged[k]
    full = [full_forward(pm, mix, [i])[0] for i in range(len(mix.sizes))]
    return patched, full


def exactness(pm: PatchedModel, device: torch.device, sizes: list[tuple[int, int]]) -> dict[str, Any]:
    """Relative errors per request of `sizes` (height, width); on a CPU float32 only."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    mix32 = random_mix(pm, sizes, device, torch.float32)
    patched, full = patched_and_full(pm, mix32)
    out: dict[str, Any] = {
        "sizes_hw": sizes,
        "fp32": [rel_err(p, f) for p, f in zip(patched, full, strict=True)],
    }
    if device.type != "cuda":
        return out
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    p_tf, f_tf = patched_and_full(pm, mix32)
    out["tf32_patched_vs_tf32_full"] = [rel_err(p, f) for p, f in zip(p_tf, f_tf, strict=True)]
    out["tf32_full_vs_fp32_full"] = [rel_err(f, r) for f, r in zip(f_tf, full, strict=True)]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    pm.model.to(torch.float16)
    mix16 = random_mix(pm, sizes, device, torch.float16)  # same draws, in float16
    p16, f16 = patched_and_full(pm, mix16)
    out["fp16_patched_vs_fp16_full"] = [rel_err(p, f) for p, f in zip(p16, f16, strict=True)]
    out["fp16_patched_vs_fp32_full"] = [rel_err(p, r) for p, r in zip(p16, full, strict=True)]
    out["fp16_full_vs_fp32_full"] = [rel_err(f, r) for f, r in zip(f16, full, strict=True)]
    return out


@torch.no_grad()
def step_costs(pm: PatchedModel, device: torch.device, repeats: int) -> list[dict[str, Any]]:
    """Per mix: median seconds of one CFG step as a plain pipeline, per resolution and patched."""
    runs = []
    for k in STEP_MIXES:
        requests = [s for s in ((512, 512), (768, 768), (1024, 1024)) for _ in range(k)]
        mix = random_mix(pm, [s for s in requests for _ in range(2)], device, torch.float16)  # 2 CFG rows
        runs.append(time_mix(pm, mix, len(requests), device, repeats))
    return runs


def time_mix(pm: PatchedModel, mix: Mix, requests: int, device: torch.device, repeats: int) -> dict[str, Any]:
    """The three ways to run one step of `mix` (request r's CFG rows are 2r and 2r + 1), interleaved."""
    batch = mix_batch(pm, mix)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(mix.sizes):
        by_size.setdefault(s, []).append(i)
    variants: dict[str, Callable[[], object]] = {
        "per_request": lambda: [full_forward(pm, mix, [2 * r, 2 * r + 1]) for r in range(requests)],
        "per_resolution": lambda: [full_forward(pm, mix, idx) for idx in by_size.values()],
        "patched": lambda: pm.forward_batch(batch),
    }
    for fn in variants.values():
        fn()
        fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))
    median = {name: statistics.median(v) for name, v in times.items()}
    print(f"  {requests} requests: " + ", ".join(f"{n} {s * 1e3:.1f} ms" for n, s in median.items()))
    return {
        "requests": requests,
        "num_patches": batch.layout.num_patches,
        "median_s": median,
        "all_s": times,
        "per_request_over_patched": median["per_request"] / median["patched"],
        "per_resolution_over_patched": median["per_resolution"] / median["patched"],
    }


def costs_for_simulator(
    model: str, out: Path, device: str, sizes: list[tuple[int, int]], patch_size: int, mixes: int
) -> None:
    """``patchedserve profile`` and the two cost files of ``bench calibrate``, in float16, into `out`."""
    profile = out / f"profile_{model}.json"
    report = out / f"profile_{model}_report.json"
    cli_main(
        [
            *("profile", "--model", model, "--device", device, "--dtype", "float16"),
            *("--mixes", str(mixes), "--repeats", "2", "--patch-size", str(patch_size)),
            *("--sizes", *(f"{w}x{h}" for h, w in sizes), "--out", str(profile), "--json", str(report)),
        ]
    )
    bundle = load_model(model)  # cached: on the device and dtype the profile moved it to
    config = Calibration(
        sizes=tuple((w, h) for h, w in sizes),
        batch_sizes=(1, 2, 4, 8),
        mixes=10,
        cache_mixes=2,
        steps=8,
        patch_size=patch_size,
    )
    overhead = LatencyPredictor.load(profile).overhead
    for execution, predictor in calibrate_all(bundle, ("image", "patched"), config, overhead).items():
        path = predictor.save(out / f"{model}_{execution}_cost.json")
        print(f"  {execution} cost: fit error {predictor.meta['fit_mape_pct']:.1f}%; wrote {path}")


def replay(
    model: str, out: Path, device: str, sizes: list[tuple[int, int]], args: argparse.Namespace
) -> None:
    """A short real ``bench slo`` of `model` in float16 on the profile and costs just written."""
    cli_main(
        [
            *("bench", "slo", "--model", model, "--device", device, "--dtype", "float16"),
            *("--systems", args.replay_systems, "--qps", args.replay_qps, "--slo-scale", "5"),
            *("--duration", str(args.replay_duration_s), "--steps", str(args.replay_steps)),
            *("--sizes", ",".join(f"{w}x{h}" for h, w in sizes), "--patch-size", str(args.patch_size)),
            *("--profile", str(out / f"profile_{model}.json")),
            *("--image-cost", str(out / f"{model}_image_cost.json")),
            *("--patched-cost", str(out / f"{model}_patched_cost.json")),
            *("--no-progress", "--out", str(out / "replay")),
        ]
    )


def stage(name: str, errors: dict[str, str], fn: Callable[[], object]) -> bool:
    """Runs one stage; a failure is printed and its traceback kept in `errors` instead of raised."""
    try:
        fn()
    except Exception:  # the lease is short: report it, then run the next stage
        errors[name] = traceback.format_exc()
        print(f"stage {name} failed:\n{errors[name]}")
        return False
    return True


def _sizes_hw(text: str) -> list[tuple[int, int]]:
    """``WxH,WxH`` -> [(height, width), ...]."""
    return [(int(h), int(w)) for w, h in (size.split("x") for size in text.split(","))]


def one_model(model: str, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Stages 1 and 2 for `model` (1 alone with ``--exact-only``); returns the report it wrote."""
    t0 = time.perf_counter()
    bundle = load_model(model).to(device=device, dtype=torch.float32)
    print(f"{model}: built and moved in {time.perf_counter() - t0:.0f} s")
    pm = PatchedModel(bundle.denoiser, args.patch_size, bundle.vae_scale_factor)
    report: dict[str, Any] = {
        "model": model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }
    path = args.out / f"{'exact' if args.exact_only else 'fullsize'}_{model}.json"

    def run_exactness() -> None:
        report["exactness"] = exactness(pm, device, args.exact_sizes)
        print(f"{model} exactness: {json.dumps(report['exactness'])}")

    def run_step_costs() -> None:
        bundle.to(dtype=torch.float16)
        report["step_costs_fp16"] = step_costs(pm, device, args.repeats)

    errors: dict[str, str] = report.setdefault("errors", {})
    stage(f"{model} exactness", errors, run_exactness)
    path.write_text(json.dumps(report, indent=1) + "\n")
    if args.exact_only:
        del bundle, pm
        unload_models()  # two full-size models do not fit a 24 GB machine together
        return report
    stage(f"{model} step costs", errors, run_step_costs)
    path.write_text(json.dumps(report, indent=1) + "\n")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="sdxl-arch,sd3-arch")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--patch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget-s", type=float, default=420.0, help="start the costs only before this")
    parser.add_argument("--replay-budget-s", type=float, default=0.0, help="start the replay before this")
    parser.add_argument("--profile-mixes", type=int, default=80)
    parser.add_argument("--exact-sizes", type=_sizes_hw, default=EXACT_SIZES, help="WxH list")
    parser.add_argument("--cost-sizes", type=_sizes_hw, default="512x512,768x768,1024x1024", help="WxH list")
    parser.add_argument("--exact-only", action="store_true", help="skip the timings and the costs")
    parser.add_argument("--replay-systems", default="patchedserve,nirvana")
    parser.add_argument("--replay-qps", default="2,4")
    parser.add_argument("--replay-duration-s", type=float, default=15.0)
    parser.add_argument("--replay-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start, device = time.perf_counter(), torch.device(args.device)
    models = args.models.split(",")
    failed: dict[str, str] = {}
    for model in models:
        failed.update(one_model(model, device, args).get("errors", {}))
        print(f"{model}: done at {time.perf_counter() - start:.0f} s")
    if args.exact_only:
        return
    first = models[0]
    if time.perf_counter() - start < args.budget_s:
        costs = (first, args.out, args.device, args.cost_sizes, args.patch_size, args.profile_mixes)
        if stage("costs", failed, lambda: costs_for_simulator(*costs)):
            if time.perf_counter() - start < args.replay_budget_s:
                stage("replay", failed, lambda: replay(first, args.out, args.device, args.cost_sizes, args))
            else:
                print("no time left for the replay")
    else:
        print("no time left for the simulator's costs")
    print(f"all done at {time.perf_counter() - start:.0f} s; failed stages: {sorted(failed) or 'none'}")


if __name__ == "__main__":
    main()
