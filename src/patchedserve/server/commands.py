"""The ``serve`` subcommand: load a model, start an engine, serve it over HTTP with uvicorn.

Registered by `patchedserve.cli`; ``make run`` runs it with the built-in default model. Engine
options are passed through to `EngineConfig` only when given, so the engine's defaults stay in one
place; once serving, it prints the URL and requests ready to paste (curl and the openai client).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import socket
from typing import Any

import uvicorn

from patchedserve.engine import Engine, EngineConfig
from patchedserve.errors import InvalidRequestError
from patchedserve.models import DEFAULT_MODEL, ModelBundle, load_model
from patchedserve.patch import PatchCacheConfig
from patchedserve.server.app import create_app


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
    ("policy", str, "scheduling policy: fcfs or slo"),
    ("max_running", int, "most requests denoised together in one step"),
    ("max_waiting", int, "most queued requests before HTTP 429"),
    ("slo_scale", float, "slo policy: deadline = arrival + scale x standalone latency"),
    ("on_infeasible", str, "slo policy: drop or best-effort"),
    ("admission", str, "slo policy: throughput or least-slack (the paper's rule)"),
    ("reserve", on_off, "slo policy: on or off; keep room in each step for the tightest recent class"),
    ("device", str, "torch device: cpu, cuda, cuda:1"),
    ("dtype", str, "float32, float16 or bfloat16"),
    ("streams", int, "parts of each step denoised side by side on a share of the CPU threads each"),
    ("profile", str, "latency profile for the slo policy (from patchedserve profile --out)"),
)
"""(EngineConfig field, type, help) of each engine option; the flag is the field with dashes."""

EXAMPLE_PROMPT = "a photo of a red cat on a city street at night"


def add_parser(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Serve a model: POST /v1/images/generations, GET /v1/models, /health, /metrics.",
    )
    serve.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or diffusers folder")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    serve.add_argument("--log-level", default="info", help="uvicorn log level")
    for name, kind, text in ENGINE_OPTIONS:
        serve.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            type=kind,
            default=None,
            help=f"{text} (default: the engine's)",
        )
    serve.add_argument(
        "--patch-cache",
        type=float,
        default=None,
        metavar="THRESHOLD",
        help="turn on the patch-level block cache (approximate): reuse a block per patch when its input "
        "changed by less than THRESHOLD (relative squared change; 0.1 is the default setting)",
    )
    serve.set_defaults(handler=run_serve)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """`EngineConfig` from the options given on the command line; the rest keep their defaults."""
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    given = {name: getattr(args, name) for name, _, _ in ENGINE_OPTIONS if getattr(args, name) is not None}
    for name in given.keys() - known:
        raise InvalidRequestError(f"--{name.replace('_', '-')} is not supported by this engine yet", name)
    if getattr(args, "patch_cache", None) is not None:
        given["patch_cache"] = PatchCacheConfig(threshold=args.patch_cache)
    return EngineConfig(**given)


def run_serve(args: argparse.Namespace) -> int:
    engine = Engine(load_model(args.model), engine_config(args))
    app = create_app(engine)
    server = AnnouncingServer(uvicorn.Config(app, args.host, args.port, log_level=args.log_level), engine)
    engine.start()
    try:
        server.run()
    except KeyboardInterrupt:
        pass  # uvicorn re-raises Ctrl-C after its graceful shutdown; for a server that is a normal stop
    finally:
        engine.stop()
    print("patchedserve: server stopped", flush=True)
    return 0


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints how to call it once its socket is bound (so ``--port 0`` shows)."""

    def __init__(self, config: uvicorn.Config, engine: Engine) -> None:
        super().__init__(config)
        self.engine = engine

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            port = self.servers[0].sockets[0].getsockname()[1]
            patch_size = self.engine.config.patch_size
            print(banner(self.config.host, port, self.engine.bundle, patch_size), flush=True)


def banner(host: str, port: int, bundle: ModelBundle, patch_size: int) -> str:
    """The URL and two requests ready to paste, at a size this engine accepts."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{port}"
    d = bundle.defaults
    width, height = (max(patch_size, side // patch_size * patch_size) for side in (d.width, d.height))
    size = f"{width}x{height}"
    body = json.dumps({"model": bundle.name, "prompt": EXAMPLE_PROMPT, "size": size})
    save = (
        "import base64, json, sys; "
        'open("cat.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'
    )
    return "\n".join(
        [
            f"patchedserve: serving {bundle.name} at {url} (OpenAI Images API)",
            f"  docs {url}/docs, metrics {url}/metrics, health {url}/health",
            "",
            "Try it with curl (writes cat.png):",
            f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\",
            f"    -d {shlex.quote(body)} \\",
            f"    | python3 -c {shlex.quote(save)}",
            "",
            "or with the openai Python client:",
            "  import base64",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{url}/v1", api_key="unused")',
            "  resp = client.images.generate(",
            f"      model={json.dumps(bundle.name)}, size={json.dumps(size)},",
            f"      prompt={json.dumps(EXAMPLE_PROMPT)},",
            f'      response_format="b64_json", extra_body={{"num_inference_steps": {d.steps}}},',
            "  )",
            '  open("cat.png", "wb").write(base64.b64decode(resp.data[0].b64_json))',
            "",
        ]
    )
