"""``patchedserve serve``'s HTTP side: uvicorn in front of ``create_app``, and the start-up banner.

Only the ``serve`` command imports it, so the CLI's other commands load no HTTP stack.
"""

from __future__ import annotations

import contextlib
import json
import shlex
import signal
import socket
import threading
from collections.abc import Iterator

import uvicorn

from patchedserve.engine.served import ServedEngine, ServedModel
from patchedserve.errors import InvalidRequestError
from patchedserve.server.app import create_app
from patchedserve.server.auth import API_KEY_ENV

EXAMPLE_PROMPT = "a photo of a red cat on a city street at night"


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` (port 0: a free one). ``serve`` binds it before the model
    loads, so a port in use is one error line at once rather than after the load."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise InvalidRequestError(f"cannot listen on {host}:{port}: {err.strerror or err}", "port") from err
    return sock


def serve(engine: ServedEngine, sock: socket.socket, log_level: str, api_key: str | None = None) -> int:
    """Serves ``engine`` over HTTP on ``sock`` (from ``listen``) until Ctrl-C, starting and
    stopping it; returns the exit code. With ``api_key`` the ``/v1`` routes ask for it
    (`server.auth`)."""
    app = create_app(engine, api_key)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(app, host, port, log_level=log_level)
    server = AnnouncingServer(config, engine, keyed=api_key is not None)
    engine.start()
    try:
        with stop_on_sigterm():
            server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated):
        pass  # uvicorn re-raises the signal after its graceful shutdown; for a server a normal stop
    finally:
        engine.stop()
    print("patchedserve: server stopped", flush=True)
    return 0


class Terminated(Exception):
    """SIGTERM, as ``stop_on_sigterm`` raises it."""


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """SIGTERM (what process managers send) stops the server as Ctrl-C does. uvicorn answers both
    with a graceful shutdown, letting the requests in flight finish, and then sends the signal
    again to the handler it found; under the default one SIGTERM would end the process there,
    before the engine (or a Ray group's replicas) could be stopped. Outside the main thread,
    where handlers cannot be set, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminated(signum: int, frame: object) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class AnnouncingServer(uvicorn.Server):
    """A uvicorn server that prints how to call it once its socket is bound (so ``--port 0`` shows)."""

    def __init__(self, config: uvicorn.Config, engine: ServedEngine, keyed: bool) -> None:
        super().__init__(config)
        self.engine = engine
        self.keyed = keyed

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.servers and self.servers[0].sockets:
            port = self.servers[0].sockets[0].getsockname()[1]
            replicas = len(self.engine.replicas_up)
            model = self.engine.served_model
            print(banner(self.config.host, port, model, replicas, self.keyed), flush=True)


def banner(host: str, port: int, model: ServedModel, replicas: int = 1, keyed: bool = False) -> str:
    """The URL and two requests ready to paste, at a size this engine accepts. A server with an
    API key gets requests that read it from ``$PATCHEDSERVE_API_KEY``; the key is never printed."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    url = f"http://{shown}:{port}"
    width, height = model.default_size
    size, steps = f"{width}x{height}", model.defaults.steps
    body = json.dumps({"model": model.name, "prompt": EXAMPLE_PROMPT, "size": size})
    save = (
        "import base64, json, sys; "
        'open("cat.png", "wb").write(base64.b64decode(json.load(sys.stdin)["data"][0]["b64_json"]))'
    )
    auth = [f'    -H "Authorization: Bearer ${API_KEY_ENV}" \\'] if keyed else []
    client_key = f'os.environ["{API_KEY_ENV}"]' if keyed else '"unused"'
    return "\n".join(
        [
            f"patchedserve: serving {model.name} at {url} (OpenAI Images API"
            + (f", {replicas} replicas on Ray)" if replicas > 1 else ")"),
            f"  docs {url}/docs, metrics {url}/metrics, health {url}/health",
            "",
            "Try it with curl (writes cat.png"
            + (f"; set {API_KEY_ENV} to the key in that shell first):" if keyed else "):"),
            f"  curl -s {url}/v1/images/generations -H 'Content-Type: application/json' \\",
            *auth,
            f"    -d {shlex.quote(body)} \\",
            f"    | python3 -c {shlex.quote(save)}",
            "",
            "or with the openai Python client:",
            "  import base64, os" if keyed else "  import base64",
            "  from openai import OpenAI",
            f'  client = OpenAI(base_url="{url}/v1", api_key={client_key})',
            "  resp = client.images.generate(",
            f"      model={json.dumps(model.name)}, size={json.dumps(size)},",
            f"      prompt={json.dumps(EXAMPLE_PROMPT)},",
            f'      response_format="b64_json", extra_body={{"num_inference_steps": {steps}}},',
            "  )",
            '  open("cat.png", "wb").write(base64.b64decode(resp.data[0].b64_json))',
            "",
        ]
    )
