"""The ``bench slo`` sweep: profile and image-level calibration if needed, then every (trace, system).

Runs go QPS by QPS with all systems at each QPS before the next, so slow drift of a shared
machine's speed spreads over the systems instead of landing on one. ``results.json`` is rewritten
after every run, so an interrupted sweep keeps what it measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from patchedserve.bench.replay import ReplayConfig, run_system
from patchedserve.bench.results import (
    machine_info,
    make_run,
    save_outcomes,
    save_steps,
    table_lines,
    write_results,
)
from patchedserve.bench.slo_commands import Trace, check_sizes, make_traces
from patchedserve.bench.systems import objectives_s, parse_systems
from patchedserve.cli import apply_streams_arg
from patchedserve.errors import InvalidRequestError
from patchedserve.models import ModelBundle, load_model
from patchedserve.scheduler import LatencyPredictor
from patchedserve.streams import resolve_streams


def ensure_profile(args: argparse.Namespace, bundle: ModelBundle, out_dir: Path) -> Path:
    """The shared profile: ``--profile``, else a quick one measured now (``out_dir/profile.json``)."""
    if args.profile is not None:
        predictor = LatencyPredictor.load(args.profile)
        if predictor.patch_size != args.patch_size:
            raise InvalidRequestError(
                f"profile {args.profile} has patch size {predictor.patch_size}, not {args.patch_size}",
                field="profile",
            )
        return Path(args.profile)
    from patchedserve.scheduler.profile import QUICK, run_profile

    print(
        "no --profile: measuring a quick one (use `patchedserve profile` for a better one)", file=sys.stderr
    )
    config = replace(QUICK, patch_size=args.patch_size, sizes=tuple(args.sizes))
    result = run_profile(bundle, config)
    return result.predictor.save(out_dir / "profile.json")


def ensure_costs(
    args: argparse.Namespace,
    bundle: ModelBundle,
    profile: Path,
    out_dir: Path,
    traces: list[Trace],
    executions: set[str],
) -> dict[str, str]:
    """The machine's step costs per execution: ``--image-cost``/``--patched-cost``, else measured now
    (``cluster.calibrate``) for the traces' sizes, right before the runs."""
    from patchedserve.cluster.calibrate import Calibration, calibrate_all

    given = {"image": args.image_cost, "patched": args.patched_cost}
    sizes = tuple(sorted({(r.width, r.height) for t in traces for r in t[2]}))
    guidance = max((r.guidance_scale for t in traces for r in t[2]), default=5.0)
    config = Calibration(
        sizes=sizes,
        batch_sizes=tuple(b for b in (1, 2, 4, 8, 12) if b <= args.max_running),
        guidance_scale=guidance,
        patch_size=args.patch_size,
        steps=int(statistics.median(r.steps for t in traces for r in t[2])) if traces[0][2] else 8,
    )
    paths = {e: str(Path(given[e]).resolve()) for e in sorted(executions) if given[e] is not None}
    needed = [e for e in sorted(executions) if given[e] is None]
    if needed:
        print(f"measuring {' and '.join(needed)} step costs for {len(sizes)} sizes ...", file=sys.stderr)
        overhead = LatencyPredictor.load(profile).overhead
        for execution, predictor in calibrate_all(bundle, needed, config, overhead).items():
            paths[execution] = str(predictor.save(out_dir / f"{execution}_cost.json").resolve())
    return paths


def run_slo_sweep(args: argparse.Namespace) -> Path:
    """Everything ``bench slo`` does; returns the path of ``results.json``."""
    try:
        systems = parse_systems(args.systems)
    except ValueError as err:
        raise InvalidRequestError(str(err), field="systems") from err
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    apply_streams_arg(args)
    out_dir: Path = args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    traces = make_traces(args, out_dir)
    check_sizes(traces, args.patch_size)
    replica_profile = check_replica_profile(args)
    with ray_cluster(args):
        bundle = load_model(args.model).to(device=args.device, dtype=getattr(torch, args.dtype))
        profile = ensure_profile(args, bundle, out_dir)
        costs = ensure_costs(args, bundle, profile, out_dir, traces, {s.execution for s in systems})
        predictor = LatencyPredictor.load(profile)
        engines_predictor = predictor if replica_profile is None else LatencyPredictor.load(replica_profile)
        config = ReplayConfig(
            profile=str(profile),
            patch_size=args.patch_size,
            max_running=args.max_running,
            device=args.device,
            dtype=args.dtype,
            progress=not args.no_progress,
            replicas=args.replicas,
            cpus_per_replica=args.cpus_per_replica,
            replica_profile=replica_profile,
            model=args.model,
        )
        meta = _meta(args, systems, profile, costs, traces, engines_predictor)
        meta["replica_profile"] = replica_profile
        runs: list[dict[str, Any]] = []
        path = out_dir / "results.json"
        for qps, scale, requests, duration_s, _ in traces:
            objectives = objectives_s(requests, predictor)
            for spec in systems:
                outcomes, log = run_system(
                    bundle, spec, requests, objectives, config, desc=f"{spec.name} @ {qps:g} qps"
                )
                run = make_run(spec.name, qps, scale, outcomes, duration_s, replicas=args.replicas or 1)
                save_outcomes(out_dir, run, outcomes)
                save_steps(out_dir, run, log.records, log.progress, log.replica)
                runs.append(run)
                print(table_lines([run])[1], file=sys.stderr)
                meta["ended"] = time.strftime("%Y-%m-%d %H:%M:%S")
                meta["machine_end"] = machine_info()
                path = write_results(out_dir, runs, meta)
    print("\n".join(table_lines(runs)))
    return path


def check_replica_profile(args: argparse.Namespace) -> str | None:
    """``--replica-profile`` made absolute, once checked for the sweep's patch size; None without it."""
    if args.replica_profile is None:
        return None
    if LatencyPredictor.load(args.replica_profile).patch_size != args.patch_size:
        message = f"replica profile {args.replica_profile} is not for patch size {args.patch_size}"
        raise InvalidRequestError(message, field="replica_profile")
    return str(Path(args.replica_profile).resolve())


@contextmanager
def ray_cluster(args: argparse.Namespace) -> Iterator[None]:
    """With ``--replicas``: Ray joined (or started) once for the sweep, and left at its end; the
    driver's torch threads become one replica's, so step costs measured here price a replica.
    Without it, nothing."""
    if args.replicas is None:
        given = [
            f for f in ("cpus_per_replica", "replica_profile", "ray_address") if getattr(args, f) is not None
        ]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise InvalidRequestError(
                f"{flag} is for a run on Ray replicas: add --replicas N", field=given[0]
            )
        yield
        return
    if args.replicas < 1:
        raise InvalidRequestError(f"replicas must be at least 1; got {args.replicas}", field="replicas")
    from patchedserve.cluster import load_ray_group

    ray_group = load_ray_group()
    ray = ray_group.ray

    owns = not ray.is_initialized()
    if owns:
        ray.init(address=args.ray_address, include_dashboard=False, configure_logging=False)
    try:
        if args.device == "cpu" and args.threads is None:
            torch.set_num_threads(
                args.cpus_per_replica or ray_group.default_cpus_per_replica(args.replicas, False)
            )
        yield
    finally:
        if owns:
            ray.shutdown()


def _meta(
    args: argparse.Namespace,
    systems: list[Any],
    profile: Path,
    costs: dict[str, str],
    traces: list[Trace],
    predictor: LatencyPredictor,
) -> dict[str, Any]:
    profile_threads = predictor.meta.get("threads")
    if profile_threads is not None and profile_threads != torch.get_num_threads():
        print(
            f"warning: the profile was measured with {profile_threads} threads, this run uses "
            f"{torch.get_num_threads()}",
            file=sys.stderr,
        )
    return {
        "kind": "real",
        "model": args.model,
        "systems": [s.name for s in systems],
        "patch_size": args.patch_size,
        "max_running": args.max_running,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "replicas": args.replicas,
        "cpus_per_replica": args.cpus_per_replica,
        "streams": resolve_streams(None, torch.device(args.device)),
        "profile": str(profile.resolve()),
        "image_cost": costs.get("image"),
        "patched_cost": costs.get("patched"),
        "traces": [
            {"qps": q, "slo_scale": s, "requests": len(r), "duration_s": d, "path": str(p.resolve())}
            for q, s, r, d, p in traces
        ],
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "machine_start": machine_info(),
    }
