"""Scale-out on Ray: engine replicas in Ray actors behind one front, called as users call it.

The module starts one local Ray instance (4 logical CPUs on this 2-core machine, so a second group
fits beside the shared one) and one group of two tiny-sdxl replicas with one torch thread each
and a patch cache that never reuses (its counts show in the metrics; its images stay exact).
Images are 64-128 px with 2-3 steps; LONG requests are what the tests cancel or lose.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import ray
from openai import OpenAI

from patchedserve.bench.replicas import run_replica_bench
from patchedserve.bench.results import (
    load_outcomes,
    load_step_progress,
    load_step_replicas,
    load_steps,
    run_file,
)
from patchedserve.bench.traces import TraceRequest, save_trace
from patchedserve.cli import build_parser, main
from patchedserve.cluster.ray_group import RayEngineGroup
from patchedserve.cluster.replica_actor import outstanding_work
from patchedserve.engine import Engine, GenerationResult, QueueFullError
from patchedserve.errors import InvalidRequestError, PatchedServeError, ReplicaLostError
from patchedserve.patch import PatchCacheConfig
from patchedserve.reference import ReferencePipeline
from patchedserve.request import GenerationRequest, RequestStatus
from patchedserve.scheduler import LatencyPredictor
from patchedserve.scheduler.features import FEATURE_NAMES
from patchedserve.server import create_app
from test_bench_slo import write_profile
from test_server import metric, png_size, serving, wait_for

MODEL = "tiny-sdxl"
OPTIONS: dict[str, Any] = {"patch_size": 64, "max_running": 8, "max_waiting": 4}
NEVER_REUSE = PatchCacheConfig(threshold=0.0)
"""The shared group's patch cache: counts every patch-block, reuses none, so images stay exact."""
MAX_PIXEL_DIFF = 1  # out of 255, as the engine's own tests against the reference
LONG = GenerationRequest("a long one", width=64, height=64, steps=500, seed=9)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    ray.init(num_cpus=4, include_dashboard=False, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def group(local_ray: None) -> Iterator[RayEngineGroup]:
    options = {**OPTIONS, "patch_cache": NEVER_REUSE}
    with RayEngineGroup(MODEL, options, 2, cpus_per_replica=1, poll_s=0.1) as g:
        yield g


def gained(group: RayEngineGroup, before: list[int]) -> list[int]:
    """Submits each replica took since ``before`` (``group.dispatched`` then)."""
    return [now - then for now, then in zip(group.dispatched, before, strict=True)]


def results(futures: list[Future[GenerationResult]]) -> list[GenerationResult]:
    return [f.result(timeout=120) for f in futures]


def test_replicas_start_where_ray_put_them_and_serve_the_model(group: RayEngineGroup) -> None:
    assert len(group.replicas) == 2
    assert all(r.served == group.served_model for r in group.replicas)
    assert [(r.device, r.threads) for r in group.replicas] == [("cpu", 1), ("cpu", 1)]
    assert group.served_model.name == MODEL and group.served_model.patch_size == 64


def test_every_replica_gives_the_reference_image(group: RayEngineGroup) -> None:
    gens = [
        GenerationRequest("a red fox", width=64, height=64, steps=3, seed=1),
        GenerationRequest("a blue car", width=128, height=64, steps=3, seed=2),
        GenerationRequest("a green hill", width=64, height=128, steps=2, seed=3),
        GenerationRequest("a grey cat", width=128, height=128, steps=2, seed=4),
    ]
    before = list(group.dispatched)
    futures = [f for g in gens for f in group.submit_many([g])]
    took = gained(group, before)
    assert sum(took) == 4 and min(took) >= 1  # the second goes where the first is not
    reference = ReferencePipeline.from_model(MODEL)
    for g, f, result in zip(gens, futures, results(futures), strict=True):
        assert result.status == RequestStatus.FINISHED, result.error
        assert result.request_id == f.request_id  # type: ignore[attr-defined]
        assert result.image is not None and result.image.size == (g.width, g.height)
        expected = np.asarray(reference.generate_request(g).image, dtype=np.int16)
        assert np.abs(np.asarray(result.image, dtype=np.int16) - expected).max() <= MAX_PIXEL_DIFF
    assert len({f.request_id for f in futures}) == len(futures)  # type: ignore[attr-defined]


def test_new_requests_go_to_the_replica_with_less_work_and_cancel_reaches_its_replica(
    group: RayEngineGroup,
) -> None:
    (long,) = group.submit_many([LONG])
    busy = group.last_replica
    assert busy is not None
    before = list(group.dispatched)
    short = [GenerationRequest(f"short {i}", width=64, height=64, steps=2, seed=i) for i in range(3)]
    futures = [f for g in short for f in group.submit_many([g])]
    assert gained(group, before)[1 - busy] == 3  # 500 steps outweigh three of two
    assert all(r.ok for r in results(futures))
    assert not long.done()
    group.cancel(long.request_id)  # type: ignore[attr-defined]
    result = long.result(timeout=60)
    assert result.status == RequestStatus.CANCELLED and result.request_id == long.request_id  # type: ignore[attr-defined]


def test_a_full_replica_is_passed_over_and_a_429_comes_when_all_are_full(local_ray: None) -> None:
    one_each = {**OPTIONS, "max_running": 1, "max_waiting": 1}
    with RayEngineGroup(MODEL, one_each, 2, cpus_per_replica=1, poll_s=0.05) as pair:
        (long,) = pair.submit_many([GenerationRequest("long", width=128, height=128, steps=500)])
        busy = pair.last_replica
        assert busy is not None
        assert wait_for(lambda: pair.num_running == 1)  # out of the queue, into the batch
        short = [GenerationRequest(f"short {i}", width=64, height=64, steps=30, seed=i) for i in range(3)]
        futures = pair.submit_many(short[:1])
        assert wait_for(lambda: pair.num_running == 2)
        futures += pair.submit_many(short[1:2])  # waits behind the first: max_running 1
        assert pair.dispatched[1 - busy] == 2
        # One slot is left, on the long one's replica: a group of two takes it, finds no room for
        # its second image, and gives the slot back (all or none).
        with pytest.raises(QueueFullError):
            pair.submit_many(short[2:] * 2)
        assert pair.dispatched[busy] == 2

        def takes(gens: list[GenerationRequest]) -> bool:  # a refused submit queues nothing
            try:
                futures.extend(pair.submit_many(gens))
            except QueueFullError:
                return False
            return True

        # The slot comes free once the replica's loop has taken the cancel, at its next step.
        assert wait_for(lambda: takes(short[2:]))  # less work on the other, but no room there
        assert pair.dispatched[busy] == 3
        with pytest.raises(QueueFullError):
            pair.submit_many(short[:1])
        pair.cancel(long.request_id)  # type: ignore[attr-defined]
        assert all(r.ok for r in results(futures))
        assert long.result(timeout=60).status == RequestStatus.CANCELLED


def test_a_replica_refuses_bad_input_with_the_engines_own_error(group: RayEngineGroup) -> None:
    with pytest.raises(InvalidRequestError, match="patch size 64 px") as bad_size:
        group.submit_many([GenerationRequest("x", width=100, height=64)])
    assert bad_size.value.field == "size"
    with pytest.raises(InvalidRequestError) as too_many:
        group.submit_many([GenerationRequest("x", width=64, height=64)] * 9)  # two queues of 4
    assert too_many.value.field == "n"


def test_a_replica_counts_what_was_just_submitted_in_its_load() -> None:
    """A burst that arrives while a step runs must see each of its requests placed: the load
    counts submitted requests before the loop takes them in at the next step boundary."""
    engine = Engine.from_model(MODEL, patch_size=64)  # never started: nothing leaves the inbox
    try:
        assert outstanding_work(engine) == 0
        engine.submit_many([GenerationRequest("x", width=128, height=64, steps=5)] * 2)
        assert outstanding_work(engine) == 2 * 2 * 5 * 2  # requests x patches x steps x CFG branches
    finally:
        engine.stop()


def test_an_n_image_group_spreads_over_the_replicas(group: RayEngineGroup) -> None:
    before = list(group.dispatched)
    gens = [GenerationRequest("four cats", width=64, height=64, steps=3, seed=i) for i in range(4)]
    futures = group.submit_many(gens)  # one call, as the server submits an n=4 request
    took = gained(group, before)
    assert sum(took) == 4 and min(took) >= 1, took  # not all four on one replica
    done = results(futures)
    assert all(r.ok for r in done)
    assert len({r.image.tobytes() for r in done if r.image is not None}) == 4  # seeds 0-3


def test_the_http_server_serves_the_group_and_counts_its_steps(group: RayEngineGroup) -> None:
    with serving(create_app(group)) as url, httpx.Client(base_url=url, timeout=60) as http:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        resp = client.images.generate(
            model=MODEL, prompt="two boats", size="128x64", n=2, extra_body={"num_inference_steps": 2}
        )
        assert [png_size(d.b64_json or "") for d in resp.data] == [(128, 64), (128, 64)]
        health = http.get("/health").json()
        fields = ("status", "model", "replicas", "replicas_up")
        assert [health[k] for k in fields] == ["ok", MODEL, 2, 2]
        steps = "patchedserve_step_latency_seconds_count"
        assert wait_for(lambda: metric(http.get("/metrics").text, steps) > 0)
        text = http.get("/metrics").text
        assert metric(text, "patchedserve_requests_total", status="finished") >= 2
        assert metric(text, "patchedserve_replicas_up") == 2
        assert "patchedserve_patch_cache_reuse_ratio 0.0" in text  # threshold 0: asked, never reused
    assert group.has_patch_cache and group.patch_cache_usage().patch_blocks > 0


def test_a_lost_replica_is_a_503_the_other_serves_and_ray_brings_it_back(
    local_ray: None, saved_model: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = saved_model(MODEL)
    monkeypatch.chdir(folder.parent)  # the replicas load the folder and profile named relative to here
    LatencyPredictor(coef=(0.03,) * len(FEATURE_NAMES), patch_size=64).save("profile.json")
    options = {**OPTIONS, "profile": "profile.json"}  # dispatch weighs predicted seconds
    short = {"prompt": "a boat", "size": "64x64", "num_inference_steps": 2}
    with RayEngineGroup(folder.name, options, 2, cpus_per_replica=1, poll_s=0.1) as pair:
        with serving(create_app(pair)) as url, httpx.Client(base_url=url, timeout=120) as http:
            answer: list[httpx.Response] = []
            body = {"prompt": LONG.prompt, "size": "64x64", "num_inference_steps": LONG.steps}
            post = lambda: answer.append(http.post("/v1/images/generations", json=body))  # noqa: E731
            sender = threading.Thread(target=post)
            sender.start()
            assert wait_for(lambda: pair.num_running == 1, timeout_s=60)
            lost = pair.last_replica
            ray.kill(pair._actors[lost], no_restart=False)  # a crash: Ray restarts the actor
            sender.join(timeout=60)
            assert answer and answer[0].status_code == 503
            error = answer[0].json()["error"]
            assert error["code"] == "replica_lost" and f"replica {lost} failed" in error["message"]
            assert http.post("/v1/images/generations", json=short).status_code == 200
            assert wait_for(lambda: pair.up == [True, True], timeout_s=120)
        before = list(pair.dispatched)
        gens = [GenerationRequest(f"after {i}", width=64, height=64, steps=3) for i in range(2)]
        assert all(r.ok for r in pair.generate(gens))
        assert gained(pair, before) == [1, 1]  # both take work again: the restarted one too
        ray.kill(pair._actors[0])  # for good this time
        with serving(create_app(pair)) as url, httpx.Client(base_url=url, timeout=60) as http:
            assert wait_for(lambda: http.get("/health").json()["status"] == "degraded")
            assert metric(http.get("/metrics").text, "patchedserve_replicas_up") == 1
            ray.kill(pair._actors[1])
            assert wait_for(lambda: http.get("/health").status_code == 503)
            assert http.get("/health").json()["status"] == "down"
        with pytest.raises(ReplicaLostError, match="no replica is up"):
            pair.submit_many(gens[:1])


def test_too_many_replicas_for_the_cluster_are_refused_at_once(local_ray: None) -> None:
    with pytest.raises(InvalidRequestError, match="need 10 CPUs") as err:
        RayEngineGroup(MODEL, OPTIONS, 5, cpus_per_replica=2)
    assert err.value.field == "replicas"
    with pytest.raises(InvalidRequestError, match="max_running"):
        RayEngineGroup(MODEL, {"max_running": 0}, 2)


def test_a_replica_that_cannot_start_is_one_line_naming_why(local_ray: None) -> None:
    with pytest.raises(PatchedServeError) as err:
        RayEngineGroup("/no/such/model", OPTIONS, 1, cpus_per_replica=1)
    assert str(err.value).startswith("a replica failed to start: ModelLoadError: ")
    assert "/no/such/model" in str(err.value) and "\n" not in str(err.value)


BANNER = r"serving tiny-sdxl at (http://127\.0\.0\.1:\d+) \(OpenAI Images API, 2 replicas on Ray\)"


def test_serve_with_replicas_from_the_command_line(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "patchedserve.cli", "serve", "--port", "0", "--patch-size", "64"]
    command += ["--replicas", "2", "--cpus-per-replica", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": ""}
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    proc = subprocess.Popen(command, cwd=tmp_path, env=env, text=True, **pipes)  # type: ignore[call-overload]
    try:
        url = ""
        for line in proc.stdout or ():
            if match := re.search(BANNER, line):
                url = match.group(1)
                break
        assert url, "the server did not start"
        body = {"prompt": "a kite", "size": "64x128", "num_inference_steps": 2}
        resp = httpx.post(f"{url}/v1/images/generations", json=body, timeout=60)
        assert resp.status_code == 200, resp.text
        assert png_size(resp.json()["data"][0]["b64_json"]) == (64, 128)
    finally:
        proc.send_signal(signal.SIGTERM)  # as a process manager stops it: the group shuts down too
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise
    assert proc.returncode == 0, err
    assert "patchedserve: server stopped" in out
    assert "Traceback" not in err


def test_replicas_below_one_are_refused_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["serve", "--replicas", "0"])
    assert exit_.value.code == 2
    assert "--replicas: must be a whole number >= 1; got '0'" in capsys.readouterr().err


def test_the_replica_bench_runs_each_system_on_the_same_burst(local_ray: None) -> None:
    report = run_replica_bench(MODEL, [(64, 64), (64, 128)], 4, 2, 64, [1], rounds=2, images=2)
    assert set(report["systems"]) == {"engine", "ray-1"}
    assert (report["group_images"], report["group_size"]) == (2, "64x64")
    for row in report["systems"].values():
        assert row["finished_min"] == 4 and len(row["burst_s"]) == 2 and len(row["single_s"]) == 2
        assert len(row["group_s"]) == 2 and row["median_group_s"] > 0
        assert all(s > 0 for s in row["burst_s"] + row["single_s"])


def test_bench_slo_replays_a_trace_on_ray_replicas_and_the_simulator_replays_it_on_as_many(
    local_ray: None, tmp_path: Path
) -> None:
    # Four requests at once: the group's dispatch spreads them over both replicas.
    trace = [TraceRequest(0.02 * i, f"prompt {i}", 64 * (1 + i % 2), 64, 2, 5.0, i, 200.0) for i in range(4)]
    profile = str(write_profile(tmp_path / "profile.json"))
    out = tmp_path / "run"
    args = ["bench", "slo", "--trace", str(save_trace(tmp_path / "trace.jsonl", trace))]
    args += ["--systems", "patchedserve", "--patch-size", "64", "--profile", profile]
    args += ["--image-cost", profile, "--patched-cost", profile, "--out", str(out), "--no-progress"]
    replica_profile = write_profile(tmp_path / "replica_profile.json")  # what the replicas schedule by
    assert (
        main([*args, "--replicas", "2", "--cpus-per-replica", "1", "--replica-profile", str(replica_profile)])
        == 0
    )
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["replicas"] == 2
    assert data["meta"]["replica_profile"] == str(replica_profile.resolve())
    (run,) = data["runs"]
    assert (run["system"], run["replicas"], run["slo_satisfaction"]) == ("patchedserve", 2, 1.0)
    outcomes = load_outcomes(run_file(out, "outcomes", "patchedserve", 2, run["qps"], run["slo_scale"]))
    assert [o.status for o in outcomes] == ["finished"] * 4
    assert all(0.0 < (o.denoised_s or 0.0) < (o.latency_s or 0.0) for o in outcomes)
    # Each replica logged its own steps; the log merges them, with unique ids and whose step it was.
    steps_file = run_file(out, "steps", "patchedserve", 2, run["qps"], run["slo_scale"])
    steps, progress = load_steps(steps_file), load_step_progress(steps_file)
    replica = load_step_replicas(steps_file)
    assert progress is not None and replica is not None and set(replica) == {0, 1}
    starts = [start for start, _, _ in steps]
    assert starts == sorted(starts) and 0.0 <= starts[0] < starts[-1] < 60.0  # on the replay's clock
    taken: dict[int, list[int]] = {}
    for step in progress:
        for request_id, step_index in step:
            taken.setdefault(request_id, []).append(step_index)
    assert sorted(taken.values()) == [[0, 1]] * 4  # four requests, two steps each, none mixed up

    sim = ["simulate", "--compare", str(out / "results.json"), "--out", str(tmp_path / "sim")]
    assert main([*sim, "--speed-trace"]) == 0
    sim_runs = json.loads((tmp_path / "sim" / "results.json").read_text())["runs"]
    assert [r["replicas"] for r in sim_runs] == [2]
    assert sim_runs[0]["speed_mean"] > 0.0  # read off both replicas' steps
    # Each replica's decodes slow the other's steps too: the speed keeps them, none is added.
    assert sim_runs[0]["decode_interference"] == 0.0
    rows = json.loads((tmp_path / "sim" / "compare.json").read_text())["rows"]
    assert [(r["real_satisfaction"], r["sim_satisfaction"]) for r in rows] == [(1.0, 1.0)]
