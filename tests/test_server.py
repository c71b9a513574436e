"""The HTTP server, called as users call it: a real uvicorn server, the openai client and httpx.

One started engine (tiny-sdxl, 64 px patches) serves most tests; a second engine whose loop never
runs fills its queue for the 429 test. Images are 64-128 px with 2-3 steps so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import uvicorn
from fastapi import FastAPI
from openai import OpenAI
from PIL import Image

from patchedserve.engine import Engine, EngineConfig, GenerationResult
from patchedserve.engine.served import ServedModel
from patchedserve.errors import InvalidRequestError
from patchedserve.models import load_model, validate_generation
from patchedserve.request import GenerationRequest, RequestStatus
from patchedserve.scheduler import LatencyPredictor, SchedulerConfig, make_scheduler
from patchedserve.scheduler.features import FEATURE_NAMES
from patchedserve.server import create_app
from patchedserve.server.auth import API_KEY_ENV, resolve_api_key
from patchedserve.server.generation import ImageService
from patchedserve.server.http import banner

MODEL = "tiny-sdxl"
FAST = {"num_inference_steps": 2}
"""Extension fields that keep a test image cheap."""
LONG = {"size": "64x64", "num_inference_steps": 500}
"""A request that takes many seconds: what tests cancel."""


@contextmanager
def serving(app: FastAPI) -> Iterator[str]:
    """Runs ``app`` on uvicorn in a thread, on a free port; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert server.started, "uvicorn did not start"
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop"


@pytest.fixture(scope="module")
def engine() -> Iterator[Engine]:
    eng = Engine.from_model(MODEL, patch_size=64, max_running=12, max_waiting=64)
    eng.start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def url(engine: Engine) -> Iterator[str]:
    with serving(create_app(engine)) as base:
        yield base


@pytest.fixture
def http(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=60) as client:
        yield client


def post(http: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return http.post("/v1/images/generations", json=body)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    sample = f"{name}{{{wanted}}}" if labels else name
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def png_size(b64: str) -> tuple[int, int]:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    assert image.format == "PNG"
    return image.size


def test_openai_client_gets_pngs_of_each_size_concurrently(url: str) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    sizes = ["64x64", "128x64", "64x128", "128x128"]

    def generate(size: str) -> Any:
        return client.images.generate(
            model=MODEL, prompt=f"a cat {size}", size=size, response_format="b64_json", n=2,
            extra_body={**FAST, "seed": 7},
        )  # fmt: skip

    with ThreadPoolExecutor(len(sizes)) as pool:
        responses = list(pool.map(generate, sizes))
    for size, resp in zip(sizes, responses, strict=True):
        width, height = (int(side) for side in size.split("x"))
        assert [png_size(img.b64_json) for img in resp.data] == [(width, height)] * 2
        assert resp.data[0].b64_json != resp.data[1].b64_json  # seed, seed + 1
        info = resp.to_dict()["patchedserve"]
        assert [img["seed"] for img in info["images"]] == [7, 8]
        assert info["images"][0]["steps"] == 2 and info["images"][0]["timings"]["latency_s"] > 0


@pytest.mark.parametrize(("fmt", "quality"), [("jpeg", 40), ("webp", None), ("png", None)])
def test_output_format_sets_the_image_file(url: str, fmt: str, quality: int | None) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)
    resp = client.images.generate(
        model=MODEL, prompt="a cat", size="128x64", output_format=fmt, output_compression=quality,
        extra_body=FAST,
    )  # fmt: skip
    assert resp.output_format == fmt
    image = Image.open(io.BytesIO(base64.b64decode(resp.data[0].b64_json or "")))
    assert image.format == fmt.upper() and image.size == (128, 64)


def test_defaults_fill_unset_fields(http: httpx.Client) -> None:
    resp = post(http, {"prompt": "a dog", "size": "auto", "num_inference_steps": 1})
    assert resp.status_code == 200, resp.text
    assert png_size(resp.json()["data"][0]["b64_json"]) == (512, 512)  # the model's default size


def test_models_and_health(url: str, http: httpx.Client) -> None:
    client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    assert [m.id for m in client.models.list()] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert http.get(f"/v1/models/{MODEL}-nope").status_code == 404
    health = http.get("/health")
    assert health.status_code == 200
    assert {k: health.json()[k] for k in ("status", "replicas", "replicas_up")} == {
        "status": "ok",
        "replicas": 1,
        "replicas_up": 1,
    }


def test_an_api_key_guards_the_v1_routes_and_leaves_health_and_metrics_open(engine: Engine) -> None:
    with serving(create_app(engine, api_key="s3cret")) as base, httpx.Client(base_url=base) as http:
        for method, path in (
            ("GET", "/v1/models"),
            ("GET", f"/v1/models/{MODEL}"),
            ("POST", "/v1/images/generations"),
            ("POST", "/v1/images/generations/abc/cancel"),
        ):
            for headers in ({}, {"Authorization": "Bearer s3cre"}, {"Authorization": "Basic s3cret"}):
                resp = http.request(method, path, headers=headers, json={"prompt": 5})
                assert resp.status_code == 401, (method, path, headers, resp.text)
                assert resp.json()["error"]["code"] == "invalid_api_key"  # not the bad body's 400
                assert resp.headers["www-authenticate"] == "Bearer"
        as_json = {"Content-Type": "application/json"}
        garbled = http.post("/v1/images/generations", content=b"{prompt:", headers=as_json)
        assert garbled.status_code == 401, garbled.text  # the key is checked before the body is parsed
        for path in ("/health", "/metrics"):
            assert http.get(path).status_code == 200
        wrong = OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        client = OpenAI(base_url=f"{base}/v1", api_key="s3cret", max_retries=0, timeout=120)
        assert [m.id for m in client.models.list()] == [MODEL]
        resp = client.images.generate(model=MODEL, prompt="a key", size="64x64", extra_body=FAST)
        assert png_size(resp.data[0].b64_json or "") == (64, 64)
        bad = http.post(
            "/v1/images/generations", headers={"Authorization": "Bearer s3cret"}, json={"prompt": 5}
        )
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt"


def test_the_api_key_comes_from_the_flag_then_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(API_KEY_ENV, raising=False)
    assert resolve_api_key(None) is None
    monkeypatch.setenv(API_KEY_ENV, "")
    assert resolve_api_key(None) is None  # set but empty: no key
    monkeypatch.setenv(API_KEY_ENV, "from-env")
    assert resolve_api_key(None) == "from-env"
    assert resolve_api_key("from-flag") == "from-flag"
    with pytest.raises(InvalidRequestError) as err:
        resolve_api_key(" ")
    assert err.value.field == "api_key"


def test_the_banner_without_a_key_sends_none() -> None:
    defaults = load_model(MODEL).defaults
    text = banner("0.0.0.0", 8123, ServedModel(MODEL, defaults, 256))
    assert "http://127.0.0.1:8123/v1/images/generations" in text
    assert "Authorization" not in text and 'api_key="unused"' in text


BAD_INPUTS: dict[str, tuple[dict[str, Any], str | None]] = {
    "no-prompt": ({"size": "64x64"}, "prompt"),
    "empty-prompt": ({"prompt": "  "}, "prompt"),
    "prompt-not-string": ({"prompt": 5}, "prompt"),
    "n-zero": ({"n": 0}, "n"),
    "n-above-10": ({"n": 11}, "n"),
    "n-string": ({"n": "2"}, "n"),
    "size-malformed": ({"size": "big"}, "size"),
    "size-not-unit": ({"size": "100x64"}, "size"),
    "size-not-patch": ({"size": "96x64"}, "size"),
    "size-too-big": ({"size": "4096x64"}, "size"),
    "size-thousands-of-digits": ({"size": "1" * 5000 + "x64"}, "size"),  # int() refuses > 4300 digits
    "steps-zero": ({"num_inference_steps": 0}, "num_inference_steps"),
    "steps-too-many": ({"num_inference_steps": 501}, "num_inference_steps"),
    "steps-float": ({"num_inference_steps": 2.5}, "num_inference_steps"),
    "guidance-string": ({"guidance_scale": "high"}, "guidance_scale"),
    "guidance-negative": ({"guidance_scale": -1}, "guidance_scale"),
    "seed-negative": ({"seed": -1}, "seed"),
    "slo-zero": ({"slo_ms": 0}, "slo_ms"),
    "unknown-model": ({"model": "dall-e-3"}, "model"),
    "unknown-sampler": ({"sampler": "heun"}, "sampler"),
    "url-format": ({"response_format": "url"}, "response_format"),
    "gif-format": ({"output_format": "gif"}, "output_format"),
    "compression-of-png": ({"output_compression": 50}, "output_compression"),
    "compression-above-100": ({"output_format": "webp", "output_compression": 101}, "output_compression"),
    "unknown-field": ({"steps": 2}, "steps"),
    "prompt-too-long": ({"prompt": "a cat " * 5400}, "prompt"),  # 32,400 characters
    "negative-too-long": ({"negative_prompt": "x" * 32_001}, "negative_prompt"),
    "model-name-huge": ({"model": "m" * 100_000}, "model"),
    "size-fullwidth-digits": ({"size": "\uff16\uff14x64"}, "size"),  # int() would read them as 64
    "slo-infinite": ({"slo_ms": float("inf")}, "slo_ms"),  # json.dumps sends Infinity
    "seed-plus-n-past-max": ({"seed": 2**63 - 1, "n": 2}, "seed"),  # image 1 would take seed + 1
    "quality-hd": ({"quality": "hd"}, "quality"),
    "background-transparent": ({"background": "transparent"}, "background"),
    "style": ({"style": "vivid"}, "style"),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_400_naming_the_field(http: httpx.Client, case: str) -> None:
    fields, param = BAD_INPUTS[case]
    body = {"prompt": "a cat", "size": "64x64", **FAST, **fields}
    body = {k: v for k, v in body.items() if not (case == "no-prompt" and k == "prompt")}
    as_json = {"Content-Type": "application/json"}  # json.dumps writes Infinity, which pydantic reads
    resp = http.post("/v1/images/generations", content=json.dumps(body), headers=as_json)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param in error["message"] and len(error["message"]) < 300  # quotes the input, shortened
    if case == "url-format":
        assert "only response_format='b64_json' is supported" in error["message"]
    if case == "seed-plus-n-past-max":  # the seed sent, and why it is too large with n images
        assert "with n 2" in error["message"] and str(2**63) not in error["message"]


def test_a_body_over_the_cap_is_413_whether_declared_or_streamed(http: httpx.Client) -> None:
    big = json.dumps({"prompt": "a cat " * 200_000, "size": "64x64"}).encode()  # 1.2 MB
    as_json = {"Content-Type": "application/json"}
    declared = http.post("/v1/images/generations", content=big, headers=as_json)

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, counted as it arrives
        for start in range(0, len(big), 64 * 1024):
            yield big[start : start + 64 * 1024]

    streamed = http.post("/v1/images/generations", content=chunks(), headers=as_json)
    for resp in (declared, streamed):
        assert resp.status_code == 413, resp.text
        assert resp.json()["error"]["code"] == "request_too_large"
    # The largest valid body: both prompts at the cap, every character an escaped surrogate pair.
    largest = {"prompt": "😀" * 32_000, "negative_prompt": "😀" * 32_000, "size": "64x64", **FAST}
    escaped = json.dumps(largest).encode()  # ensure_ascii: 12 bytes per character
    assert len(escaped) > 760_000
    assert http.post("/v1/images/generations", content=escaped, headers=as_json).status_code == 200


@pytest.mark.parametrize("raw", ["{prompt:", "[1, 2]", ""])
def test_malformed_body_is_400(http: httpx.Client, raw: str) -> None:
    resp = http.post("/v1/images/generations", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["type"] == "invalid_request_error"
    assert "Content-Type" not in resp.json()["error"]["message"]  # it was sent as JSON


@pytest.mark.parametrize(
    "raw", [b'{"prompt": "a \xff cat"}', b"[" * 5000 + b"]" * 5000], ids=["utf8", "nested"]
)
def test_a_body_json_cannot_decode_is_400_invalid_json(http: httpx.Client, raw: bytes) -> None:
    resp = http.post("/v1/images/generations", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["code"] == "invalid_json"


def test_openai_fields_at_values_that_describe_our_images_are_accepted(http: httpx.Client) -> None:
    body = {"prompt": "a cat", "size": "64x64", **FAST}
    extra = {"quality": "auto", "background": "opaque", "moderation": "low", "user": "u1"}
    resp = post(http, {**body, **extra})
    assert resp.status_code == 200, resp.text
    assert png_size(resp.json()["data"][0]["b64_json"]) == (64, 64)
    style = post(http, {**body, "style": "natural"}).json()["error"]["message"]
    assert "OpenAI Images API" in style and "not supported" in style  # known, not an "unknown" typo


def test_a_forced_quit_answers_the_requests_in_flight_with_a_json_503(engine: Engine) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, 30)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    with ThreadPoolExecutor(1) as pool, httpx.Client(base_url=base, timeout=60) as http:
        pending = pool.submit(post, http, {"prompt": "a cat", **LONG})
        assert wait_for(lambda: engine.num_running > 0, 30)
        server.should_exit = True  # the first Ctrl-C: a graceful shutdown begins...
        time.sleep(0.3)
        server.force_exit = True  # ...and the second forces it
        resp = pending.result(timeout=60)
    thread.join(timeout=30)
    sock.close()
    assert not thread.is_alive()
    assert resp.status_code == 503, resp.text
    assert resp.json()["error"]["code"] == "server_shutting_down"
    assert wait_for(lambda: engine.num_running == 0 and engine.num_waiting == 0)  # its image was cancelled


def test_a_body_sent_without_the_json_content_type_is_told_so(http: httpx.Client) -> None:
    # what `curl -d '{...}'` sends when -H 'Content-Type: application/json' is forgotten
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    resp = http.post("/v1/images/generations", content=b'{"prompt": "a cat"}', headers=form)
    assert resp.status_code == 400, resp.text
    assert "Content-Type: application/json" in resp.json()["error"]["message"]


def test_more_images_than_the_queue_holds_is_400_and_a_group_is_queued_whole() -> None:
    stalled = Engine.from_model(MODEL, patch_size=64, max_waiting=3)  # its loop never runs
    try:
        stalled.submit(GenerationRequest(prompt="first", width=64, height=64, steps=2))
        body = {"prompt": "a cat", "size": "64x64"}
        with serving(create_app(stalled)) as base:
            too_many = httpx.post(f"{base}/v1/images/generations", json={**body, "n": 4})
            no_room = httpx.post(f"{base}/v1/images/generations", json={**body, "n": 3})
        assert too_many.status_code == 400, too_many.text
        assert too_many.json()["error"]["param"] == "n"
        assert no_room.status_code == 429, no_room.text
        assert stalled.scheduler.num_waiting + len(stalled.submitted()) == 1  # neither left a part behind
    finally:
        stalled.stop()


def test_full_queue_is_429_with_retry_after() -> None:
    stalled = Engine.from_model(MODEL, patch_size=64, max_waiting=1)
    try:
        stalled.submit(GenerationRequest(prompt="first", width=64, height=64, steps=2))  # loop never runs
        with serving(create_app(stalled)) as base:
            resp = httpx.post(f"{base}/v1/images/generations", json={"prompt": "a cat", "size": "64x64"})
        assert resp.status_code == 429, resp.text
        assert resp.headers["Retry-After"] == "1"
        assert resp.json()["error"]["code"] == "queue_full"
    finally:
        stalled.stop()


def test_metrics_count_steps_and_results(http: httpx.Client) -> None:
    before = http.get("/metrics").text
    for name in (
        "patchedserve_queue_length",
        "patchedserve_active_requests",
        "patchedserve_step_patches",
        "patchedserve_step_latency_seconds",
        "patchedserve_queue_wait_seconds",
        "patchedserve_requests_total",
        "patchedserve_slo_requests_total",
    ):
        assert f"# TYPE {name.removesuffix('_total')}" in before
    resp = post(http, {"prompt": "a cat", "size": "128x64", **FAST})
    assert resp.status_code == 200, resp.text
    after = http.get("/metrics").text
    assert metric(after, "patchedserve_requests_total", status="finished") == (
        metric(before, "patchedserve_requests_total", status="finished") + 1
    )
    latency = "patchedserve_request_latency_seconds_count"
    assert metric(after, latency, resolution="128x64") == metric(before, latency, resolution="128x64") + 1
    steps = "patchedserve_step_latency_seconds_count"
    assert metric(after, steps) >= metric(before, steps) + 2
    waits = "patchedserve_queue_wait_seconds_count"
    assert metric(after, waits) == metric(before, waits) + 1


def test_client_disconnect_cancels_the_engine_request(engine: Engine, http: httpx.Client, url: str) -> None:
    cancelled = 'patchedserve_requests_total{status="cancelled"}'
    before = metric(http.get("/metrics").text, cancelled)
    with pytest.raises(httpx.ReadTimeout):  # connecting may take long on a busy machine; reading may not
        httpx.post(
            f"{url}/v1/images/generations",
            json={"prompt": "a slow cat", **LONG},
            timeout=httpx.Timeout(60, read=1.0),
        )
    assert wait_for(lambda: metric(http.get("/metrics").text, cancelled) == before + 1, timeout_s=60)
    assert wait_for(lambda: engine.scheduler.num_running == 0 and engine.scheduler.num_waiting == 0, 60)


@pytest.mark.parametrize("gen_id", ["job-1", "team/job-1"])
def test_cancel_endpoint_ends_a_running_generation(http: httpx.Client, gen_id: str) -> None:
    assert http.post(f"/v1/images/generations/{gen_id}/cancel").status_code == 404
    with ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            http.post,
            "/v1/images/generations",
            json={"prompt": "a cat", **LONG},
            headers={"X-Request-ID": gen_id},
        )
        answers: list[httpx.Response] = []

        def cancel() -> bool:
            answers.append(http.post(f"/v1/images/generations/{gen_id}/cancel"))
            return answers[-1].status_code == 200

        assert wait_for(cancel, 60)
        resp = pending.result(timeout=60)
    assert answers[-1].json() == {
        "id": gen_id,
        "object": "image.generation.cancel",
        "cancelled": True,
        "num_open": 1,
    }
    assert resp.status_code == 409, resp.text
    assert resp.json()["error"]["code"] == "request_cancelled"
    assert resp.headers["x-should-retry"] == "false"  # the openai client would resend it otherwise


class GatedEngine:
    """``engine`` whose ``submit_many`` waits for ``gate``, as a Ray group's placement waits on its
    replicas; everything else is the engine's own."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.queued: list[Any] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def submit_many(self, gens: list[GenerationRequest]) -> list[Any]:
        self.entered.set()
        assert self.gate.wait(60), "the test never opened the gate"
        self.queued = self.engine.submit_many(gens)
        return self.queued


def test_a_slow_submission_leaves_the_server_answering_and_a_cancel_meanwhile_holds(engine: Engine) -> None:
    gated = GatedEngine(engine)
    app = create_app(gated)  # type: ignore[arg-type]
    with serving(app) as base, httpx.Client(base_url=base) as client, ThreadPoolExecutor(1) as pool:
        pending = pool.submit(
            client.post,
            "/v1/images/generations",
            json={"prompt": "a cat", "n": 2, **LONG},
            headers={"X-Request-ID": "job-gated"},
            timeout=60,
        )
        assert gated.entered.wait(60)
        # The submission is stuck in submit_many; the event loop must still answer.
        assert client.get("/health", timeout=5).status_code == 200
        cancel = client.post("/v1/images/generations/job-gated/cancel", timeout=5)
        assert cancel.json()["num_open"] == 2, cancel.text
        gated.gate.set()
        resp = pending.result(timeout=60)
    assert resp.status_code == 409, resp.text
    assert "by a cancel call" in resp.json()["error"]["message"]
    assert [f.result(timeout=60).status for f in gated.queued] == [RequestStatus.CANCELLED] * 2


def test_what_a_cancelled_submission_queues_afterwards_is_cancelled(engine: Engine) -> None:
    gated = GatedEngine(engine)
    service = ImageService(gated)  # type: ignore[arg-type]
    gens = [GenerationRequest("a cat", width=64, height=64, steps=500)]

    async def cancel_while_queueing() -> None:
        task = asyncio.ensure_future(service._submit(gens))
        while not gated.entered.is_set():
            await asyncio.sleep(0.01)
        task.cancel()  # as server shutdown cancels its handlers
        with pytest.raises(asyncio.CancelledError):
            await task
        gated.gate.set()
        while not gated.queued:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # the thread's done-callback runs on this loop

    asyncio.run(cancel_while_queueing())
    assert gated.queued[0].result(timeout=60).status == RequestStatus.CANCELLED


def test_slo_policy_drop_is_503_and_deadlines_are_counted() -> None:
    # A synthetic predictor (30 ms per step and patch) spares the engine's start-up profile.
    predictor = LatencyPredictor(coef=(0.03,) * len(FEATURE_NAMES), patch_size=64)
    scheduler = make_scheduler("slo", predictor, SchedulerConfig(on_infeasible="drop"))
    slo_engine = Engine(load_model(MODEL), EngineConfig(patch_size=64, policy="slo"), scheduler=scheduler)
    slo_engine.start()
    try:
        with serving(create_app(slo_engine)) as base, httpx.Client(base_url=base, timeout=60) as http:
            dropped = post(http, {"prompt": "a cat", "size": "128x128", **FAST, "slo_ms": 1})
            met = post(http, {"prompt": "a cat", "size": "64x64", **FAST, "slo_ms": 60_000})
            text = http.get("/metrics").text
    finally:
        slo_engine.stop()
    assert dropped.status_code == 503, dropped.text
    error = dropped.json()["error"]
    assert (error["type"], error["code"]) == ("server_error", "slo_infeasible")
    assert "deadline" in error["message"]
    assert met.status_code == 200, met.text
    assert met.json()["patchedserve"]["images"][0]["deadline_met"] is True
    assert metric(text, "patchedserve_requests_total", status="dropped") == 1
    assert metric(text, "patchedserve_slo_requests_total", outcome="met") == 1
    assert metric(text, "patchedserve_slo_requests_total", outcome="missed") == 1


def test_a_failed_result_is_500_with_the_reason(engine: Engine) -> None:
    params = validate_generation(engine.bundle)
    result = GenerationResult(0, RequestStatus.FAILED, None, params, {}, error="decode failed: boom")
    err = ImageService(engine)._result_error(result, "img-1")
    assert (err.status, err.body.error.type, err.body.error.code) == (
        500,
        "server_error",
        "generation_failed",
    )
    assert "decode failed: boom" in err.body.error.message
    assert err.headers == {"x-should-retry": "false"}


def test_serve_on_a_port_in_use_fails_at_once_before_the_model_loads(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import patchedserve.models
    from patchedserve.cli import main

    def never(*_: object, **__: object) -> None:
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(patchedserve.models, "load_model", never)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}: ") and err.count("\n") == 1, err


def test_serve_command_prints_a_request_ready_to_paste(tmp_path: Path) -> None:
    """With the key from the environment: the banner's requests send it without printing it."""
    command = [sys.executable, "-m", "patchedserve.cli", "serve", "--port", "0", "--patch-size", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", API_KEY_ENV: "k3y-from-env"}
    proc = subprocess.Popen(
        command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()

    def read() -> None:
        for line in proc.stdout or ():
            lines.put(line)
        lines.put("")  # end of output: the server exited

    threading.Thread(target=read, daemon=True).start()
    try:
        first = lines.get(timeout=120)
        match = re.search(r"serving tiny-sdxl at (http://127\.0\.0\.1:\d+)", first)
        assert match, first
        body = ""
        while "python3 -c" not in body and (line := lines.get(timeout=10)):
            body += line
        payload = json.loads(re.search(r"-d '(\{.*\})'", body).group(1))  # type: ignore[union-attr]
        assert payload["model"] == MODEL and payload["size"] == "512x512"
        assert f'-H "Authorization: Bearer ${API_KEY_ENV}"' in body and "k3y-from-env" not in body
        base = match.group(1)
        assert httpx.get(f"{base}/health", timeout=10).json()["status"] == "ok"
        assert httpx.get(f"{base}/v1/models", timeout=10).status_code == 401
        keyed = httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer k3y-from-env"}, timeout=10)
        assert keyed.json()["data"][0]["id"] == MODEL
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()  # never leave the server holding its port
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert "Traceback" not in err
