"""``patchedserve bench slo``, ``bench calibrate`` and ``bench report``, and the trace/system flags that
``patchedserve simulate`` (``cluster.commands``) shares with them.

``bench slo`` loads the model once, makes one trace per (QPS, SLO scale), replays it on a fresh
engine of every system on the wall clock (``bench.replay``) and writes ``results.json``, the
per-request outcomes, the traces and the plots into ``--out``. Without ``--profile`` it measures a
quick profile first; without ``--image-cost``/``--patched-cost`` it measures the machine's step
costs (``cluster.calibrate``) so ``simulate --compare`` can replay the same traces in virtual time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from patchedserve.bench.traces import (
    ARRIVALS,
    MIXES,
    TraceConfig,
    TraceRequest,
    load_trace,
    make_trace,
    save_trace,
)
from patchedserve.cli import add_streams_arg, apply_streams_arg, at_least_one, check_output_paths
from patchedserve.errors import InvalidRequestError

Trace = tuple[float, float, list[TraceRequest], float, Path]
"""(qps, slo_scale, requests, duration_s, file) of one trace of a sweep."""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"expected positive finite numbers, got {text!r}")
    return values


def _ints(text: str) -> list[int]:
    values = _floats(text)
    if any(v != int(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected whole numbers, got {text!r}")
    return [int(v) for v in values]


def _sizes(text: str) -> list[tuple[int, int]]:
    """``"256x256,512x256"`` -> [(width, height), ...]."""
    try:
        return [(int(w), int(h)) for w, h in (p.lower().split("x") for p in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"sizes must be WIDTHxHEIGHT,...; got {text!r}") from None


def add_trace_args(p: argparse.ArgumentParser) -> None:
    """Flags that make (or load) the traces of a sweep."""
    g = p.add_argument_group("trace")
    g.add_argument("--qps", type=_floats, default=[0.25, 0.5, 1.0], help="offered loads, e.g. 0.25,0.5,1")
    g.add_argument("--slo-scale", type=_floats, default=[5.0], help="SLO multipliers, one sweep each")
    g.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per trace")
    g.add_argument("--sizes", type=_sizes, default=[(256, 256), (512, 256), (512, 512)], help="WxH list")
    g.add_argument("--mix", choices=MIXES, default="uniform", help="resolution mix (skewed: 50/25/25)")
    g.add_argument("--weights", type=_floats, default=None, help="shares of the sizes for --mix custom")
    g.add_argument("--steps", type=_ints, default=[8], help="step counts, drawn per request")
    g.add_argument("--guidance", type=float, default=5.0, help="CFG scale of every request")
    g.add_argument("--arrivals", choices=ARRIVALS, default="poisson")
    g.add_argument("--burstiness", type=float, default=1.0, help="CV of gaps for --arrivals gamma")
    g.add_argument("--repetition", type=float, default=0.0, help="probability of reusing an earlier prompt")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--trace", type=Path, default=None, help="replay this JSONL trace instead (ignores the above)"
    )


def add_system_args(p: argparse.ArgumentParser, default_systems: str) -> None:
    """Flags of the compared systems and where results go."""
    p.add_argument("--model", default="tiny-sdxl", help="built-in name or diffusers folder")
    p.add_argument("--systems", default=default_systems, help="comma-separated, from bench.systems.SYSTEMS")
    p.add_argument("--patch-size", type=at_least_one, default=256, help="patch side in pixels")
    p.add_argument("--max-running", type=int, default=12, help="batch cap of the batching systems")
    p.add_argument("--profile", type=Path, default=None, help="latency profile (patchedserve profile --out)")
    p.add_argument("--image-cost", type=Path, default=None, help="image-level step cost (bench calibrate)")
    p.add_argument("--patched-cost", type=Path, default=None, help="patched step cost (bench calibrate)")
    p.add_argument("--out", type=Path, required=True, help="folder for results.json, plots, traces")


def make_traces(args: argparse.Namespace, out_dir: Path) -> list[Trace]:
    """The sweep's traces, written to ``out_dir/traces`` (the same file serves every system)."""
    if args.trace is not None:
        requests, config = load_trace(args.trace)
        last_s = max((r.arrival_s for r in requests), default=0.0)
        duration_s = config.duration_s if config else last_s if last_s > 0 else 1.0
        qps = config.qps if config else len(requests) / duration_s
        scales = sorted(r.slo_scale for r in requests)
        path = save_trace(out_dir / "traces" / Path(args.trace).name, requests, config)
        return [(qps, scales[len(scales) // 2] if scales else 5.0, requests, duration_s, path)]
    try:
        base = TraceConfig(
            duration_s=args.duration,
            arrivals=args.arrivals,
            burstiness=args.burstiness,
            mix=args.mix,
            sizes=tuple(args.sizes),
            weights=tuple(args.weights) if args.weights else None,
            steps=tuple(args.steps),
            guidance_scale=args.guidance,
            repetition=args.repetition,
            seed=args.seed,
        )
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    traces = []
    for scale in args.slo_scale:
        for qps in args.qps:
            try:
                config = replace(base, qps=qps, slo_scales=(scale,))
            except ValueError as err:  # a load the trace cannot hold
                raise InvalidRequestError(str(err), field="qps") from err
            requests = make_trace(config)
            path = save_trace(out_dir / "traces" / f"qps{qps:g}_slo{scale:g}.jsonl", requests, config)
            traces.append((qps, scale, requests, config.duration_s, path))
    return traces


def check_sizes(traces: list[Trace], patch_size: int) -> None:
    for _, _, requests, _, _ in traces:
        bad = sorted({r.size for r in requests if r.width % patch_size or r.height % patch_size})
        if bad:
            raise InvalidRequestError(
                f"sizes {', '.join(bad)} are not multiples of the patch size {patch_size} px", field="size"
            )


def add_parsers(group: Any) -> None:
    """Adds ``slo``, ``calibrate`` and ``report`` to the ``bench`` command group."""
    slo = group.add_parser("slo", help="replay traces on every system on the wall clock (SLO satisfaction)")
    add_trace_args(slo)
    add_system_args(slo, "image-fcfs,res-batch,nirvana,patched-fcfs,patchedserve,patchedserve-cache")
    threads_help = "torch CPU threads (match the profile's)"
    slo.add_argument("--threads", type=at_least_one, default=None, help=threads_help)
    add_streams_arg(slo)
    slo.add_argument("--device", default="cpu")
    slo.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    slo.add_argument("--no-progress", action="store_true", help="no progress bars")
    ray = slo.add_argument_group("replicas on Ray (what serve --replicas runs)")
    ray.add_argument(
        "--replicas", type=int, default=None, help="serve each system from N engine replicas on Ray"
    )
    ray.add_argument(
        "--cpus-per-replica",
        type=int,
        default=None,
        help="CPUs and torch threads per replica (default: the cluster's shared out)",
    )
    ray.add_argument(
        "--replica-profile",
        type=Path,
        default=None,
        help="the replicas' latency profile, measured at their threads (default: --profile, "
        "which still sets every deadline)",
    )
    ray.add_argument("--ray-address", default=None, help="Ray cluster to join (default: start a local one)")
    slo.set_defaults(handler=run_slo)

    cal = group.add_parser("calibrate", help="measure the machine's step costs for the simulator")
    cal.add_argument("--model", default="tiny-sdxl")
    cal.add_argument("--sizes", type=_sizes, default=[(256, 256), (512, 256), (512, 512)])
    cal.add_argument("--batch-sizes", type=_ints, default=[1, 2, 4, 8, 12])
    cal.add_argument("--guidance", type=float, default=5.0)
    cal.add_argument("--patch-size", type=at_least_one, default=256)
    cal.add_argument("--profile", type=Path, default=None, help="take encode/decode costs from this profile")
    cal.add_argument("--threads", type=at_least_one, default=None)
    add_streams_arg(cal)
    cal.add_argument("--device", default="cpu")
    cal.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    cal.add_argument("--out", type=Path, required=True, help="folder for image_cost.json, patched_cost.json")
    cal.set_defaults(handler=run_calibrate)
    add_report_parser(group)


def add_report_parser(group: Any) -> None:
    report = group.add_parser("report", help="markdown tables of a results.json (bench slo or simulate)")
    report.add_argument("results", type=Path, help="results.json")
    report.add_argument(
        "--reference",
        default="patchedserve",
        help="system the QPS-at-90%% ratios and the shortfalls are taken against",
    )
    report.set_defaults(handler=run_report)


def run_report(args: argparse.Namespace) -> int:
    from patchedserve.bench.report import report_lines
    from patchedserve.bench.results import load_results

    try:
        lines = report_lines(load_results(args.results), args.reference)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def run_slo(args: argparse.Namespace) -> int:
    from patchedserve.bench.slo_run import run_slo_sweep
    from patchedserve.engine.config import check_device

    check_device(args.device)  # before the model loads

    start = time.perf_counter()
    path = run_slo_sweep(args)
    print(f"wrote {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    check_output_paths(folder=args.out)  # before the calibration is measured
    import torch

    from patchedserve.engine.config import check_device

    check_device(args.device)

    from patchedserve.cluster.calibrate import Calibration, calibrate_all
    from patchedserve.models import load_model
    from patchedserve.scheduler import LatencyPredictor

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_streams_arg(args)
    bundle = load_model(args.model).to(device=args.device, dtype=getattr(torch, args.dtype))
    overhead = LatencyPredictor.load(args.profile).overhead if args.profile else None
    config = Calibration(
        sizes=tuple(args.sizes),
        batch_sizes=tuple(args.batch_sizes),
        guidance_scale=args.guidance,
        patch_size=args.patch_size,
    )
    for execution, predictor in calibrate_all(bundle, ("image", "patched"), config, overhead).items():
        path = predictor.save(args.out / f"{execution}_cost.json")
        print(
            f"{execution} step cost: fit error {predictor.meta['fit_mape_pct']:.1f}% over "
            f"{len(predictor.meta['samples'])} groups, {predictor.meta['wall_s']:.0f} s; wrote {path}"
        )
    return 0
