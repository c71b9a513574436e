"""The ``serve`` subcommand: load a model, start an engine, serve it over HTTP with uvicorn.

Registered by `patchedserve.cli`; ``make run`` runs it with the built-in default model. Engine
options are passed through to `EngineConfig` only when given, so the engine's defaults stay in one
place; once serving, it prints the URL and requests ready to paste (curl and the openai client).
With ``--replicas N`` (or ``--ray-address``) it serves N engines on a Ray cluster instead
(`cluster.ray_group.RayEngineGroup`), each request going to the least-loaded one.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
from typing import TYPE_CHECKING, Any

from patchedserve.cli import at_least_one
from patchedserve.errors import InvalidRequestError
from patchedserve.models.names import DEFAULT_MODEL

if TYPE_CHECKING:  # torch and diffusers load with the command, not with the parser
    from patchedserve.engine import EngineConfig


def on_off(text: str) -> bool:
    """``on``/``off`` (also true/false, yes/no, 1/0) -> bool, for switch options."""
    value = text.strip().lower()
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected on or off, got {text!r}")


ENGINE_OPTIONS: tuple[tuple[str, Any, str], ...] = (
    ("patch_size", int, "patch side in pixels; image sides must be multiples of it"),
    ("policy", str, "scheduling policy: fcfs, slo or res-fcfs"),
    ("max_running", int, "most requests denoised together in one step"),
    ("max_waiting", int, "most queued requests before HTTP 429"),
    ("slo_scale", float, "slo policy: deadline = arrival + scale x standalone latency"),
    ("on_infeasible", str, "slo policy: drop or best-effort"),
    ("admission", str, "slo policy: throughput or least-slack (the paper's rule)"),
    ("reserve", on_off, "slo policy: on or off; keep room in each step for the tightest recent class"),
    ("pause", on_off, "slo policy: on or off; requests with time to spare sit steps out for urgent ones"),
    (
        "inline_decode",
        float,
        "slo policy: decode at once, pausing the steps, a request left with "
        "fewer than this many decode times to its deadline (0: off)",
    ),
    ("device", str, "torch device: cpu, cuda, cuda:1"),
    ("dtype", str, "float32, float16 or bfloat16"),
    (
        "streams",
        int,
        "parts of each step denoised side by side on a share of the CPU threads each "
        "(default: 2 on a CPU with >= 2 threads, else 1)",
    ),
    (
        "profile",
        str,
        "latency profile for the slo policy, from patchedserve profile --out (default: a quick "
        "profile measured at start-up)",
    ),
)
"""(EngineConfig field, type, help) of each engine option; the flag is the field with dashes."""


def shown_default(field: str) -> str:
    """``EngineConfig``'s default of ``field`` as the flag takes it (``on``/``off`` for switches)."""
    from patchedserve.engine.config import EngineConfig  # plain data: no torch

    value = next(f.default for f in dataclasses.fields(EngineConfig) if f.name == field)
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def port_number(text: str) -> int:
    """A TCP port, 0-65535 (0: any free one)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port from 0 to 65535; got {text!r}")
    return value


def add_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model: POST /v1/images/generations, GET /v1/models, /health, /metrics.",
    )
    serve.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or diffusers folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=port_number, default=8000, help="0 picks a free port")
    serve.add_argument(
        "--log-level", default="info", choices=["critical", "error", "warning", "info", "debug", "trace"]
    )
    serve.add_argument(
        "--api-key",
        default=None,
        help="answer /v1 requests only with Authorization: Bearer API_KEY (default: "
        "$PATCHEDSERVE_API_KEY if set, which keeps the key out of process listings; else no key)",
    )
    for name, kind, text in ENGINE_OPTIONS:
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,  # not given: EngineConfig's own default applies
            help=text if "(default:" in text else f"{text} (default: {shown_default(name)})",
        )
    serve.add_argument(
        "--patch-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="turn on the patch-level block cache (approximate): reuse a block's last output for "
        "an image whose input to it changed by less than THRESHOLD (relative squared change; 0.1 "
        "is the default setting)",
    )
    scale = serve.add_argument_group("scale-out on Ray (pip install 'patchedserve[ray]')")
    scale.add_argument(
        "--replicas",
        type=at_least_one,
        default=None,
        help="serve this many engines, each in its own Ray actor (one GPU each on CUDA); requests go "
        "to the one with the least predicted work (default: one engine in this process)",
    )
    scale.add_argument(
        "--ray-address",
        default=None,
        help="Ray cluster to place the replicas on (auto, ray://HOST:10001); default: the local one",
    )
    scale.add_argument(
        "--cpus-per-replica",
        type=at_least_one,
        default=None,
        help="CPUs Ray reserves per replica, also its torch threads on a CPU device "
        "(default: 1 on CUDA, else the cluster's CPUs shared out)",
    )
    serve.set_defaults(handler=run_serve)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """`EngineConfig` from the options given on the command line; the rest keep their defaults."""
    from patchedserve.engine import EngineConfig

    return EngineConfig(**engine_options(args))


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `EngineConfig` fields given on the command line."""
    from patchedserve.engine import EngineConfig
    from patchedserve.patch import PatchCacheConfig

    known = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {name: getattr(args, name) for name, _, _ in ENGINE_OPTIONS if getattr(args, name) is not None}
    for name in given.keys() - known:
        raise InvalidRequestError(f"--{name.replace('_', '-')} is not supported by this engine yet", name)
    if getattr(args, "patch_cache", None) is not None:
        given["patch_cache"] = PatchCacheConfig(threshold=args.patch_cache)
    return given


def run_serve(args: argparse.Namespace) -> int:
    from patchedserve.server.auth import resolve_api_key
    from patchedserve.server.http import listen, serve  # the HTTP stack loads for this command alone

    api_key = resolve_api_key(args.api_key)
    sock = listen(args.host, args.port)  # before the model loads: a port in use fails at once
    with contextlib.closing(sock):
        if args.replicas is None and args.ray_address is None:
            from patchedserve.engine import Engine
            from patchedserve.models import load_model

            engine = Engine(load_model(args.model), engine_config(args))
            return serve(engine, sock, args.log_level, api_key)
        from patchedserve.cluster import load_ray_group

        group = load_ray_group().RayEngineGroup(
            args.model,
            engine_options(args),
            1 if args.replicas is None else args.replicas,
            address=args.ray_address,
            cpus_per_replica=args.cpus_per_replica,
        )
        try:
            return serve(group, sock, args.log_level, api_key)
        finally:
            group.shutdown()
