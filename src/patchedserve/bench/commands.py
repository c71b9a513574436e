"""``patchedserve bench ...``: the benchmark command group (step, burst, replicas; slo, calibrate
and report from ``bench.slo_commands``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from patchedserve.bench.slo_commands import add_parsers as add_slo_parsers
from patchedserve.cli import at_least_one, check_output_paths
from patchedserve.errors import InvalidRequestError


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """``"512x512,768x512"`` (width x height) -> [(height, width), ...]."""
    sizes = []
    for part in text.split(","):
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise InvalidRequestError(
                f"size {part!r} is not WIDTHxHEIGHT, e.g. 768x512", field="size"
            ) from None
        sizes.append((h, w))
    return sizes


def parse_ints(text: str, field: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise InvalidRequestError(
            f"{field} must be comma-separated integers; got {text!r}", field=field
        ) from None
    if any(v < 1 for v in values):
        raise InvalidRequestError(f"{field} values must be at least 1; got {text!r}", field=field)
    return values


def add_parser(subparsers: Any) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks that write JSON (and plots)")
    group = bench.add_subparsers(dest="bench_command", metavar="BENCH", required=True)
    step = group.add_parser("step", help="one patched step over a mixed set vs image-level baselines")
    step.add_argument("--model", default="tiny-sdxl")
    step.add_argument("--sizes", default="512x512,768x768,1024x1024", help="WxH list")
    step.add_argument("--per-size", default="1,4", help="requests of each size, one mix per value")
    step.add_argument("--patch-size", type=int, default=256, help="patch side in image pixels")
    step.add_argument("--repeats", type=at_least_one, default=3)
    step.add_argument("--device", default="auto", help="auto, cpu or cuda")
    step.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    step.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    step.add_argument("--max-patches-per-call", type=int, default=None, help="chunk the patched step")
    step.add_argument("--json", type=Path, default=None, help="write the report here")
    step.set_defaults(handler=run_step)

    burst = group.add_parser("burst", help="engine throughput on a burst vs the reference one at a time")
    burst.add_argument("--model", default="tiny-sdxl")
    burst.add_argument("--sizes", default="512x512,768x768,1024x1024", help="WxH list, cycled")
    burst.add_argument("--count", type=at_least_one, default=12)
    burst.add_argument("--steps", type=int, default=10)
    burst.add_argument("--guidance", type=float, default=5.0)
    burst.add_argument("--patch-size", type=int, default=256)
    burst.add_argument("--max-running", type=int, default=12)
    burst.add_argument("--json", type=Path, default=None)
    burst.set_defaults(handler=run_burst)

    replicas = group.add_parser(
        "replicas", help="a burst through N Ray engine replicas vs one engine in-process (needs ray)"
    )
    replicas.add_argument("--model", default="tiny-sdxl")
    replicas.add_argument("--sizes", default="256x256,512x256,512x512", help="WxH list, cycled")
    replicas.add_argument("--count", type=int, default=24)
    replicas.add_argument("--steps", type=int, default=8)
    replicas.add_argument("--patch-size", type=int, default=256)
    replicas.add_argument("--replicas", default="1,2", help="replica counts to compare, e.g. 1,2")
    replicas.add_argument("--rounds", type=int, default=3, help="bursts per system, taken in turns")
    replicas.add_argument("--device", default="cpu", help="cpu, or cuda: one GPU per replica")
    replicas.add_argument(
        "--images", type=int, default=4, help="also time one request for this many images (0: skip)"
    )
    replicas.add_argument("--json", type=Path, default=None)
    replicas.set_defaults(handler=run_replicas)

    add_slo_parsers(group)  # slo, calibrate, report


def run_step(args: argparse.Namespace) -> int:
    check_output_paths(args.json)  # before the measuring
    import torch

    from patchedserve.engine.config import check_device

    if args.device != "auto":
        check_device(args.device)

    from patchedserve.bench.step import run_step_bench, summary_lines, write_report

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    report = run_step_bench(
        args.model,
        parse_sizes(args.sizes),
        parse_ints(args.per_size, "per_size"),
        args.patch_size,
        args.repeats,
        args.device,
        args.dtype,
        args.max_patches_per_call,
    )
    write_report(report, args.json)
    print("\n".join(summary_lines(report)))
    if args.json:
        print(f"wrote {args.json}")
    return 0


def run_burst(args: argparse.Namespace) -> int:
    check_output_paths(args.json)
    from patchedserve.bench.burst import run_burst_bench
    from patchedserve.bench.step import write_report

    report = run_burst_bench(
        args.model,
        parse_sizes(args.sizes),
        args.count,
        args.steps,
        args.guidance,
        args.patch_size,
        args.max_running,
    )
    write_report(report, args.json)
    engine = f"{report['engine_images_per_min']:.2f} img/min ({report['engine_s']:.1f} s)"
    reference = f"{report['reference_images_per_min']:.2f} img/min ({report['reference_s']:.1f} s)"
    print(
        f"{report['count']} requests x {report['steps']} steps on {report['model']}: engine {engine}, "
        f"reference one at a time {reference}, x{report['speedup']:.2f}"
    )
    return 0


def run_replicas(args: argparse.Namespace) -> int:
    check_output_paths(args.json)
    from patchedserve.bench.replicas import run_replica_bench
    from patchedserve.bench.step import write_report

    if args.count < 1 or args.rounds < 1 or args.images < 0:
        raise InvalidRequestError("--count and --rounds must be at least 1, --images at least 0", "count")
    report = run_replica_bench(
        args.model,
        parse_sizes(args.sizes),
        args.count,
        args.steps,
        args.patch_size,
        parse_ints(args.replicas, "replicas"),
        args.rounds,
        args.device,
        args.images,
    )
    write_report(report, args.json)
    print(f"{report['count']} requests x {report['steps']} steps on {report['model']}, {report['device']}:")
    for name, row in report["systems"].items():
        print(
            f"  {name:>8}: burst {row['median_burst_s']:.2f} s ({row['images_per_min']:.1f} img/min, "
            f"x{row['speedup_vs_engine']:.2f} the engine), "
            f"one small request alone {row['median_single_s']:.3f} s"
            + (
                f", one {report['group_images']}-image request {row['median_group_s']:.2f} s"
                if row["median_group_s"] is not None
                else ""
            )
        )
    return 0
