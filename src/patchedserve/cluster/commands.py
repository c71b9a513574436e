"""``patchedserve simulate``: the SLO benchmark in virtual time, on 1..N replicas, from a profile.

Same trace and system flags as ``bench slo`` and the same ``results.json`` (+ plots). The
schedulers predict with ``--profile``; the simulated machine spends ``--patched-cost`` (default:
the profile itself) and ``--image-cost`` (image-level systems). Any profile file works, e.g. one
built from a GPU's figures. ``--replicas 1,2,4,8`` runs every sweep on each count
behind the least-predicted-load dispatcher (``--qps-per-replica`` multiplies the offered load by
the count). ``--compare DIR/results.json`` re-runs a real ``bench slo`` sweep on its own traces,
profile and machine costs and prints the differences; ``--speed-trace`` lets the simulated machine
be as slow as the real one was, run by run (``cluster.speed``). Registered by ``patchedserve.cli``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchedserve.bench.slo_commands import Trace, _ints, add_system_args, add_trace_args, make_traces
from patchedserve.bench.traces import load_trace
from patchedserve.cli import at_least_one, positive_number
from patchedserve.errors import InvalidRequestError

if TYPE_CHECKING:
    from patchedserve.cluster.costs import MachineCosts


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "simulate",
        help="the SLO benchmark in virtual time (1..N replicas), from a latency profile",
        description="Replay traces on simulated engines: the real scheduling policies on a virtual clock, "
        "step costs from a profile.",
    )
    add_trace_args(p)
    add_system_args(p, "image-fcfs,res-batch,nirvana,patched-fcfs,patchedserve,patchedserve-cache")
    p.add_argument("--replicas", type=_ints, default=[1], help="replica counts, e.g. 1,2,4,8")
    p.add_argument("--qps-per-replica", action="store_true", help="offered load = each --qps x replicas")
    p.add_argument("--max-waiting", type=int, default=256, help="queue bound per replica")
    p.add_argument("--cost-scale", type=float, default=1.0, help="multiply every cost (slower machine > 1)")
    p.add_argument(
        "--nirvana-similarity",
        choices=["model", "exact"],
        default="model",
        help="prompt similarity for NIRVANA's cache: the model's embeddings, or exact repeats only",
    )
    p.add_argument(
        "--compare", type=Path, default=None, help="a bench slo results.json to re-run and compare"
    )
    p.add_argument(
        "--speed-trace",
        action="store_true",
        help="with --compare: scale costs by the machine speed each real run measured over time",
    )
    p.add_argument("--speed-bucket", type=positive_number, default=5.0, help="seconds per speed-trace bucket")
    p.add_argument(
        "--step-noise",
        type=_noise,
        default=0.0,
        help="per-step jitter: std of log(step time) (0: none), or 'measured' with --speed-trace: each "
        "real run's own step-to-step spread",
    )
    p.add_argument(
        "--patch-cache-steps",
        type=Path,
        default=None,
        help="a patched cost file (bench calibrate) whose per-step patch cache profile prices the "
        "cached systems' steps (default: the --patched-cost file's own, if it has one)",
    )
    p.add_argument(
        "--noise-seeds",
        type=at_least_one,
        default=1,
        help="with step noise: replay each trace under this many jitter seeds and report the pooled "
        "(expected) figures; each seed's satisfaction is kept in results.json",
    )
    p.add_argument(
        "--decode-interference",
        type=float,
        default=None,
        help="share of the loop's speed a running decode takes (default: the patched calibration's); "
        "--speed-trace takes each run's steps net of it, except on Ray replicas, whose speed keeps it",
    )
    p.add_argument(
        "--decode-slowdown",
        type=float,
        default=None,
        help="a worker decode's time beside the running loop over its time alone (default: the "
        "patched calibration's measurement, meta.decode_slowdown in its cost file; 1 without one)",
    )
    p.set_defaults(handler=run_simulate)


def _decode_overrides(costs: MachineCosts, args: argparse.Namespace) -> MachineCosts:
    """The decode contention given on the command line, where given, over the calibration's."""
    if args.decode_interference is not None:
        costs = replace(costs, decode_interference=args.decode_interference)
    if args.decode_slowdown is not None:
        costs = replace(costs, decode_slowdown=args.decode_slowdown)
    return costs


def _noise(text: str) -> float | str:
    if text == "measured":
        return text
    value = float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"step noise must be >= 0 or 'measured'; got {text!r}")
    return value


def _embedder(similarity: str, model: str) -> Callable[[], Any]:
    from patchedserve.cluster.simulator import ModelEmbedder, exact_embedder

    if similarity == "exact":
        return exact_embedder
    cache: list[Any] = []

    def make() -> Any:  # one embedder (and one model load) for the whole sweep, if one is asked for
        if not cache:
            from patchedserve.models import load_model  # the model stack loads only then

            cache.append(ModelEmbedder(load_model(model)))
        return cache[0]

    return make


def _load(path: str | Path | None) -> Any:
    from patchedserve.scheduler import LatencyPredictor

    return None if path is None else LatencyPredictor.load(path)


def run_simulate(args: argparse.Namespace) -> int:
    from patchedserve.bench.results import table_lines, write_results
    from patchedserve.bench.systems import parse_systems
    from patchedserve.cluster.costs import MachineCosts
    from patchedserve.cluster.simulator import SimConfig
    from patchedserve.cluster.sweep import simulate_traces

    if args.compare is not None:
        return run_compare(args)
    if args.profile is None:
        raise InvalidRequestError("simulate needs --profile (patchedserve profile --out)", field="profile")
    try:
        systems = parse_systems(args.systems)
        base = SimConfig(
            patch_size=args.patch_size,
            max_running=args.max_running,
            max_waiting=args.max_waiting,
            cost_scale=args.cost_scale,
        )
    except ValueError as err:
        raise InvalidRequestError(str(err)) from err
    if args.step_noise == "measured":
        raise InvalidRequestError(
            "--step-noise measured needs --compare and --speed-trace", field="step_noise"
        )
    profile = _load(args.profile)
    costs = replace(MachineCosts.load(args.image_cost, args.patched_cost), step_noise=args.step_noise)
    costs = _with_cache_steps(costs, args.patch_cache_steps)
    costs = _decode_overrides(costs, args)
    embedder = _embedder(args.nirvana_similarity, args.model)
    runs: list[dict[str, Any]] = []
    traces_meta: list[dict[str, Any]] = []
    for n in args.replicas:
        qps = [q * n for q in args.qps] if args.qps_per_replica else args.qps
        traces = make_traces(argparse.Namespace(**{**vars(args), "qps": qps}), args.out / f"{n}r")
        traces_meta += [
            {"replicas": n, "qps": q, "slo_scale": s, "requests": len(r), "path": str(p)}
            for q, s, r, _, p in traces
        ]
        runs += simulate_traces(
            traces,
            systems,
            profile,
            costs,
            replace(base, replicas=n),
            embedder,
            log=lambda line: print(line, file=sys.stderr),
            noise_seeds=args.noise_seeds,
        )
    meta = _meta(args, systems, traces_meta)
    path = write_results(args.out, runs, meta)
    print("\n".join(table_lines(runs)))
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _meta(args: argparse.Namespace, systems: list[Any], traces: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "kind": "simulated",
        "model": args.model,
        "systems": [s.name for s in systems],
        "patch_size": args.patch_size,
        "max_running": args.max_running,
        "replicas": args.replicas,
        "profile": str(args.profile),
        "image_cost": str(args.image_cost) if args.image_cost else None,
        "patched_cost": str(args.patched_cost) if args.patched_cost else None,
        "cost_scale": args.cost_scale,
        "step_noise": args.step_noise,
        "noise_seeds": args.noise_seeds,
        "nirvana_similarity": args.nirvana_similarity,
        "traces": traces,
    }


def run_compare(args: argparse.Namespace) -> int:
    """Simulates the traces of a real run with its profile and settings; prints and writes the differences."""
    from patchedserve.bench.results import load_results, write_results
    from patchedserve.bench.systems import parse_systems
    from patchedserve.cluster.costs import MachineCosts
    from patchedserve.cluster.simulator import SimConfig
    from patchedserve.cluster.sweep import compare_lines, compare_runs, simulate_traces

    real = load_results(args.compare)
    meta = real["meta"]
    profile = _load(args.profile or meta["profile"])
    costs = MachineCosts.load(
        args.image_cost or meta.get("image_cost"), args.patched_cost or meta.get("patched_cost")
    )
    costs = _with_cache_steps(costs, args.patch_cache_steps)
    systems = parse_systems(",".join(meta["systems"]))
    traces: list[Trace] = []
    for t in meta["traces"]:
        requests, _ = load_trace(t["path"])
        traces.append((t["qps"], t["slo_scale"], requests, t["duration_s"], Path(t["path"])))
    replicas = meta.get("replicas") or 1  # a real run on Ray replicas: as many simulated ones
    config = SimConfig(
        replicas=replicas,
        patch_size=meta["patch_size"],
        max_running=meta["max_running"],
        cost_scale=args.cost_scale,
    )
    measured_noise = args.step_noise == "measured"
    if measured_noise and not args.speed_trace:
        raise InvalidRequestError("--step-noise measured needs --speed-trace", field="step_noise")
    if not measured_noise:
        costs = replace(costs, step_noise=args.step_noise)
    costs = _decode_overrides(costs, args)  # a speed trace is taken net of this interference
    embedder = _embedder(args.nirvana_similarity, meta["model"])
    speed_for = None
    if args.speed_trace:
        trajectories = {(t[0], t[1]): _trajectory(t[2]) for t in traces}
        speed_for = _speed_reader(
            Path(args.compare).parent, profile, costs, args.speed_bucket, trajectories, replicas
        )
    runs = simulate_traces(
        traces,
        systems,
        profile,
        costs,
        config,
        embedder,
        speed_for=speed_for,
        measured_noise=measured_noise,
        noise_seeds=args.noise_seeds,
        engine_profile=_load(meta.get("replica_profile")),
    )
    sim_meta = {
        **meta,
        "kind": "simulated",
        "compared_with": str(args.compare),
        "cost_scale": args.cost_scale,
        "nirvana_similarity": args.nirvana_similarity,
        "speed_trace": args.speed_trace,
        "step_noise": args.step_noise,
        "noise_seeds": args.noise_seeds,
    }
    write_results(args.out, runs, sim_meta)
    real_dir = Path(args.compare).parent
    rows = compare_runs([_with_decode_phase(r, real_dir) for r in real["runs"]], runs)
    (args.out / "compare.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print("\n".join(compare_lines(rows)))
    return 0


def _with_decode_phase(run: dict[str, Any], real_dir: Path) -> dict[str, Any]:
    """``run`` with its decode phase P50 read off its outcomes file, for results.json files
    written before ``summarize`` reported it (as is, where it has it or has no outcomes file)."""
    from patchedserve.bench.metrics import summarize
    from patchedserve.bench.results import find_run_file, load_outcomes

    replicas = run.get("replicas", 1)
    path = find_run_file(real_dir, "outcomes", run["system"], replicas, run["qps"], run["slo_scale"])
    if "decode_p50_s" in run or not path.exists():
        return run
    return {**run, "decode_p50_s": summarize(load_outcomes(path), run["duration_s"])["decode_p50_s"]}


def _with_cache_steps(costs: Any, path: Path | None) -> Any:
    """``costs`` with the per-step patch cache profile of the cost file at ``path``, if given."""
    if path is None:
        return costs
    from patchedserve.cluster.costs import MachineCosts

    steps = MachineCosts.load(None, path).patch_cache_steps
    if not steps:
        raise InvalidRequestError(f"{path} has no per-step patch cache profile", field="patch_cache_steps")
    return replace(costs, patch_cache_steps=steps)


def _trajectory(requests: Any) -> int | None:
    """The step count every request of a trace takes, or None if they differ."""
    counts = {r.steps for r in requests}
    return counts.pop() if len(counts) == 1 else None


def _speed_reader(
    real_dir: Path,
    profile: Any,
    costs: Any,
    bucket_s: float,
    trajectories: dict[tuple[float, float], int | None],
    replicas: int = 1,
) -> Callable[[Any, float, float], Any]:
    """(system spec, qps, SLO scale) -> the ``SpeedTrace`` of that real run's step log (of all its
    replicas' steps, for a run on Ray replicas), or None without one."""
    from patchedserve.bench.results import (
        find_run_file,
        load_outcomes,
        load_step_progress,
        load_step_replicas,
        load_steps,
    )
    from patchedserve.cluster.costs import cost_model
    from patchedserve.cluster.speed import SpeedTrace, decode_phases, infer_progress

    def decoding(spec: Any, qps: float, scale: float) -> list[tuple[float, float]] | None:
        """The run's decode phases (denoised to finished) in trace time; None for Ray replicas
        (each engine's decodes slow the others' steps too) or where the outcomes lack them."""
        path = find_run_file(real_dir, "outcomes", spec.name, replicas, qps, scale)
        if replicas > 1 or not path.exists():
            return None
        return decode_phases(load_outcomes(path)) or None

    def speed_for(spec: Any, qps: float, scale: float) -> SpeedTrace | None:
        path = find_run_file(real_dir, "steps", spec.name, replicas, qps, scale)
        if not path.exists():
            return None
        cost = cost_model(spec.execution, profile, costs, patch_cache=spec.patch_cache)
        steps, logged = load_steps(path), load_step_progress(path)
        trajectory = trajectories.get((qps, scale))
        progress = None
        if cost.cache_steps and trajectory:
            if logged is not None:
                progress = [[(k, trajectory) for _, k in taken] for taken in logged]
            else:
                progress = infer_progress(steps, trajectory)
        if cost.cache_steps and progress is None:
            print(f"warning: {path}: no step indices; speed from the flat cache factor", file=sys.stderr)
        ids = None if logged is None else [[i for i, _ in taken] for taken in logged]
        return SpeedTrace.from_steps(
            steps, cost, bucket_s, progress, ids, load_step_replicas(path), decoding(spec, qps, scale)
        )

    return speed_for
