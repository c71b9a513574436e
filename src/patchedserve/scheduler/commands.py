"""The ``patchedserve profile`` subcommand: measure mixes, fit the latency predictor, write the
profile (read back by ``LatencyPredictor.load``) and a JSON report. Registered by `patchedserve.cli`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from patchedserve.cli import add_streams_arg, apply_streams_arg, at_least_one, check_output_paths
from patchedserve.errors import InvalidRequestError
from patchedserve.models.names import DEFAULT_MODEL
from patchedserve.reference.commands import parse_size
from patchedserve.scheduler.config import DEFAULT_PATCH_SIZE, DEFAULT_SIZES, ProfileConfig


def add_parser(subparsers: Any) -> None:
    defaults = ProfileConfig()
    parser = subparsers.add_parser(
        "profile",
        help="measure step latencies of random mixes and fit the latency predictor",
        description=(
            "Time random mixes of requests on the patched model, fit the scheduler's latency predictor on "
            "a training split and report its error on the held-out mixes."
        ),
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or diffusers folder")
    parser.add_argument("--patch-size", type=int, default=DEFAULT_PATCH_SIZE, help="patch side in pixels")
    parser.add_argument("--mixes", type=int, default=defaults.mixes, help="random mixes to time")
    parser.add_argument(
        "--sizes", type=parse_size, nargs="+", default=list(DEFAULT_SIZES), help="WIDTHxHEIGHT of requests"
    )
    parser.add_argument(
        "--max-requests", type=int, default=defaults.max_requests, help="requests per mix, at most"
    )
    parser.add_argument(
        "--repeats", type=at_least_one, default=defaults.repeats, help="timed runs per mix (median kept)"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument(
        "--clock",
        choices=["auto", "thread", "wall"],
        default=defaults.clock,
        help="thread: CPU time of the timing thread (CPU, one thread); wall; auto picks (default)",
    )
    parser.add_argument(
        "--drift-window",
        type=int,
        default=defaults.drift_window,
        help="runs on each side that estimate the machine's drifting speed (0: no drift correction)",
    )
    parser.add_argument("--compare", action="store_true", help="also report the MAPE of alternative models")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    threads_help = "torch CPU threads (default: torch's)"
    parser.add_argument("--threads", type=at_least_one, default=None, help=threads_help)
    add_streams_arg(parser)
    parser.add_argument("--out", type=Path, required=True, help="profile file to write (JSON)")
    parser.add_argument("--json", type=Path, default=None, help="report to write (JSON)")
    parser.set_defaults(handler=run_profile_command)


def run_profile_command(args: argparse.Namespace) -> int:
    check_output_paths(args.out, args.json)  # before the profile is measured
    import torch

    from patchedserve.engine.config import check_device

    check_device(args.device)

    from patchedserve.models import load_model
    from patchedserve.scheduler.compare import compare_models
    from patchedserve.scheduler.profile import run_profile

    try:
        config = ProfileConfig(
            patch_size=args.patch_size,
            mixes=args.mixes,
            sizes=tuple(args.sizes),
            max_requests=args.max_requests,
            repeats=args.repeats,
            seed=args.seed,
            clock=args.clock,
            drift_window=args.drift_window,
        )
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_streams_arg(args)
    bundle = load_model(args.model).to(device=args.device, dtype=getattr(torch, args.dtype))
    print(f"profiling {config.mixes} mixes of {bundle.name} on {args.device} ...", file=sys.stderr)
    result = run_profile(bundle, config)
    samples = {
        name: [{"entries": [list(e) for e in s.entries], "latency_s": s.latency_s} for s in part]
        for name, part in (("train", result.train), ("test", result.test))
    }
    result.predictor.save(args.out, extra={"samples": samples})
    report = {**result.report, "profile": str(args.out)}
    if args.compare:
        report["compare_heldout_mape"] = compare_models(
            result.train, result.test, config.patch_size, config.seed
        )
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    print(
        f"held-out MAPE {report['heldout_mape']:.2f}% on {report['n_test']} mixes "
        f"({report['heldout_mape_raw']:.2f}% without drift correction; train {report['train_mape']:.2f}% on "
        f"{report['n_train']}; repeat spread {report['noise_pct']:.1f}%; {report['meta']['clock']} clock), "
        f"{report['wall_s']:.0f} s; wrote {args.out}"
    )
    return 0
