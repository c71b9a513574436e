"""The engine against the reference pipeline: same image whatever a request was batched with."""

from __future__ import annotations

import itertools
import time
import types
from functools import cache

import numpy as np
import pytest

from patchedserve.engine import Engine, GenerationResult, QueueFullError
from patchedserve.errors import InvalidRequestError
from patchedserve.reference import ReferencePipeline
from patchedserve.request import GenerationRequest, Request, RequestStatus
from patchedserve.scheduler import QueueScheduler, SchedulerOutput

MAX_PIXEL_DIFF = 1  # out of 255
"""Float32 rounding (about 1e-6 here) can move a pixel across one 8-bit rounding boundary, not two."""


@cache
def reference(model: str) -> ReferencePipeline:
    return ReferencePipeline.from_model(model)


def reference_image(model: str, g: GenerationRequest) -> np.ndarray:
    return np.asarray(reference(model).generate_request(g).image, dtype=np.int16)


def assert_matches_reference(model: str, g: GenerationRequest, result: GenerationResult) -> None:
    assert result.status == RequestStatus.FINISHED, result.error
    assert result.image is not None and result.image.size == (g.width, g.height)
    diff = np.abs(np.asarray(result.image, dtype=np.int16) - reference_image(model, g)).max()
    assert diff <= MAX_PIXEL_DIFF


@pytest.fixture
def sdxl_engine() -> Engine:
    engine = Engine.from_model("tiny-sdxl", patch_size=64, decode_in_thread=False)
    yield engine
    engine.stop()


MIXED = [
    GenerationRequest("a red fox", width=128, height=64, steps=4, seed=1, sampler="euler"),
    GenerationRequest("a dog", width=64, height=64, steps=3, guidance_scale=1.0, seed=2, sampler="euler"),
    GenerationRequest(
        "a cow", negative_prompt="blurry", width=64, height=192, steps=5, seed=3, sampler="dpmpp_2m"
    ),
    GenerationRequest("a fox", width=128, height=128, steps=2, guidance_scale=3.0, seed=4, sampler="ddim"),
]


def test_mixed_batch_equals_reference_for_every_request(sdxl_engine: Engine) -> None:
    results = sdxl_engine.generate(MIXED)
    for g, r in zip(MIXED, results, strict=True):
        assert_matches_reference("tiny-sdxl", g, r)


def test_sd3_flow_matching_mixed_batch_equals_reference() -> None:
    engine = Engine.from_model("tiny-sd3", patch_size=32, decode_in_thread=False)
    reqs = [
        GenerationRequest("a boat", width=64, height=32, steps=3, seed=5),
        GenerationRequest("a lake", width=32, height=32, steps=2, guidance_scale=1.0, seed=6),
        GenerationRequest("a hill", width=96, height=64, steps=4, guidance_scale=4.0, seed=7),
    ]
    try:
        for g, r in zip(reqs, engine.generate(reqs), strict=True):
            assert_matches_reference("tiny-sd3", g, r)
    finally:
        engine.stop()


def test_requests_join_and_leave_at_every_step(sdxl_engine: Engine) -> None:
    # A new request arrives before every step while earlier ones finish at different steps, so the
    # batch composition changes at every step boundary, in both directions.
    arrivals = [
        GenerationRequest(
            f"prompt {i}",
            width=64 * (1 + i % 2),
            height=64 * (1 + i // 3),
            steps=2 + i % 3,
            guidance_scale=1.0 if i % 2 else 4.0,
            seed=10 + i,
            sampler=("euler", "dpmpp_2m")[i % 2],
        )
        for i in range(6)
    ]
    futures, compositions = [], []
    for g in arrivals:
        futures.append(sdxl_engine.submit(g))
        sdxl_engine.step()
        compositions.append(tuple(r.request_id for r in sdxl_engine.scheduler.running))
    while sdxl_engine.has_work():
        sdxl_engine.step()
    assert len(set(compositions)) == len(compositions)  # every step saw a different running set
    for g, f in zip(arrivals, futures, strict=True):
        assert_matches_reference("tiny-sdxl", g, f.result(timeout=0))


def test_timings_follow_the_request_through_its_stages() -> None:
    # One slot: the second request queues while the first denoises (both arrive together), so its
    # queue wait covers the first one's steps, and it ends before its own prompt is encoded.
    engine = Engine.from_model("tiny-sdxl", patch_size=64, max_running=1, decode_in_thread=False)
    reqs = [GenerationRequest(f"queued {i}", width=64, height=64, steps=2, seed=i) for i in range(2)]
    try:
        first, second = (r.timings for r in engine.generate(reqs))
    finally:
        engine.stop()
    stages = ("queue_s", "encode_done_s", "first_step_s", "denoise_done_s", "latency_s")
    for t in (first, second):
        seconds = [t[k] for k in stages]
        assert None not in seconds and seconds == sorted(seconds) and seconds[0] >= 0, t
        assert t["queue_s"] < t["encode_done_s"] < t["first_step_s"]
    assert second["queue_s"] > first["denoise_done_s"]


@pytest.mark.parametrize("execution", ["patched", "image"])
def test_paused_requests_resume_where_they_left_off(execution: str) -> None:
    # Every other step, every other request sits out (SchedulerOutput.paused), so requests leave
    # and rejoin the batch mid-trajectory, second-order sampler memory included (dpmpp_2m).
    engine = Engine.from_model(
        "tiny-sdxl", patch_size=64, execution=execution, policy="fcfs", decode_in_thread=False
    )
    calls = itertools.count()
    paused: list[int] = []

    def alternate(self: QueueScheduler, now_s: float, out: SchedulerOutput) -> list[Request]:
        k, joined = next(calls), {r.request_id for r in out.admitted}
        stepping = [r for i, r in enumerate(out.running) if r.request_id in joined or (k + i) % 2 == 0]
        stepping = stepping or out.running[:1]
        paused.append(len(out.running) - len(stepping))
        return stepping

    engine.scheduler._step_set = types.MethodType(alternate, engine.scheduler)  # type: ignore[method-assign]
    try:
        for g, r in zip(MIXED, engine.generate(MIXED), strict=True):
            assert_matches_reference("tiny-sdxl", g, r)
    finally:
        engine.stop()
    assert sum(paused) >= len(MIXED)


@pytest.mark.parametrize("execution", ["patched", "image"])
def test_a_paused_request_outlives_a_failed_step(execution: str) -> None:
    # B sits out the step that fails: that step's batch is lost with A, B's latents are not.
    engine = Engine.from_model(
        "tiny-sdxl", patch_size=64, execution=execution, policy="fcfs", decode_in_thread=False
    )
    calls = itertools.count()

    def fail(self: object) -> None:
        raise RuntimeError("device lost")

    def pause_b_once(self: QueueScheduler, now_s: float, out: SchedulerOutput) -> list[Request]:
        if next(calls) != 1:
            return out.running
        engine.batch.step = types.MethodType(fail, engine.batch)  # type: ignore[method-assign]
        return out.running[:1]

    engine.scheduler._step_set = types.MethodType(pause_b_once, engine.scheduler)  # type: ignore[method-assign]
    a = GenerationRequest("a", width=64, height=64, steps=3, seed=1)
    b = GenerationRequest("b", width=128, height=64, steps=4, seed=2, sampler="dpmpp_2m")
    try:
        result_a, result_b = engine.generate([a, b])
    finally:
        engine.stop()
    assert result_a.status == RequestStatus.FAILED and "device lost" in (result_a.error or "")
    assert_matches_reference("tiny-sdxl", b, result_b)


def test_cancellation_frees_the_request_and_the_rest_go_on(sdxl_engine: Engine) -> None:
    keep = GenerationRequest("stay", width=64, height=64, steps=4, seed=1)
    drop = GenerationRequest("leave", width=128, height=64, steps=6, seed=2)
    f_keep, f_drop = sdxl_engine.submit(keep), sdxl_engine.submit(drop)
    sdxl_engine.step()
    sdxl_engine.step()
    sdxl_engine.cancel(f_drop.request_id)  # type: ignore[attr-defined]
    sdxl_engine.step()
    cancelled = f_drop.result(timeout=0)
    assert cancelled.status == RequestStatus.CANCELLED and cancelled.image is None
    assert all(r.request_id != f_drop.request_id for r in sdxl_engine.scheduler.running)  # type: ignore[attr-defined]
    while sdxl_engine.has_work():
        sdxl_engine.step()
    assert_matches_reference("tiny-sdxl", keep, f_keep.result(timeout=0))


def test_a_failing_decode_fails_only_its_request(
    sdxl_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    import patchedserve.engine.engine as engine_module

    real = engine_module.decode_latents

    def flaky(bundle, latents):  # type: ignore[no-untyped-def]
        if latents.shape[-1] == 16:  # the 128 px wide request
            raise RuntimeError("boom")
        return real(bundle, latents)

    monkeypatch.setattr(engine_module, "decode_latents", flaky)
    good = GenerationRequest("fine", width=64, height=64, steps=2, seed=1)
    bad = GenerationRequest("broken", width=128, height=64, steps=2, seed=2)
    r_good, r_bad = sdxl_engine.generate([good, bad])
    assert r_bad.status == RequestStatus.FAILED and "boom" in (r_bad.error or "")
    assert_matches_reference("tiny-sdxl", good, r_good)


@pytest.mark.parametrize("inline", [True, False])
def test_the_policy_chooses_between_the_decode_worker_and_the_loop(
    inline: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import threading

    import patchedserve.engine.engine as engine_module

    real, threads = engine_module.decode_latents, []

    def recorded(bundle, latents):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(bundle, latents)

    monkeypatch.setattr(engine_module, "decode_latents", recorded)
    engine = Engine.from_model("tiny-sdxl", patch_size=64)  # decodes on its worker by default
    try:
        monkeypatch.setattr(engine.scheduler, "decode_inline", lambda r, now_s, ahead=(): inline)
        [result] = engine.generate([GenerationRequest("p", width=64, height=64, steps=2, seed=1)])
    finally:
        engine.stop()
    assert result.status == RequestStatus.FINISHED
    assert threads == [threading.current_thread().name if inline else "decode"]  # generate runs the loop here


def test_a_failing_step_fails_its_batch_and_the_loop_goes_on(
    sdxl_engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}
    real = sdxl_engine.model.forward_batch

    def once_broken(batch):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("device lost")
        return real(batch)

    monkeypatch.setattr(sdxl_engine.model, "forward_batch", once_broken)
    first = sdxl_engine.generate([GenerationRequest("x", width=64, height=64, steps=3, seed=1)])[0]
    assert first.status == RequestStatus.FAILED and "device lost" in (first.error or "")
    later = GenerationRequest("y", width=64, height=64, steps=2, seed=2)
    assert_matches_reference("tiny-sdxl", later, sdxl_engine.generate([later])[0])


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 96}, "size"),  # a multiple of the model unit but not of the 64 px patch
        ({"width": 0}, "width"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"sampler": "nope"}, "sampler"),
        ({"prompt": 123}, "prompt"),  # refused here, not by the tokenizer at the next step
        ({"prompt": "p" * 32_001}, "prompt"),
        ({"negative_prompt": None}, "negative_prompt"),
        ({"slo_ms": -5.0}, "slo_ms"),
        ({"slo_ms": float("inf")}, "slo_ms"),
        ({"slo_ms": "100"}, "slo_ms"),  # a named error, not a TypeError from a comparison
        ({"width": 100}, "size"),  # neither rule: the patch size is the one to quote
    ],
)
def test_bad_requests_are_refused_with_the_field(sdxl_engine: Engine, kwargs: dict, field: str) -> None:
    waiting = sdxl_engine.num_waiting
    with pytest.raises(InvalidRequestError) as err:
        sdxl_engine.submit(GenerationRequest(**{"prompt": "p", "width": 64, "height": 64, **kwargs}))
    assert err.value.field == field
    assert sdxl_engine.num_waiting == waiting  # nothing was queued


def test_a_size_error_quotes_this_engines_patch_size() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=256)
    with pytest.raises(InvalidRequestError, match="multiples of 256"):
        engine.submit(GenerationRequest("a", width=300, height=256))  # not even the model's 32 px unit


def test_a_request_without_a_size_gets_the_default_rounded_to_the_patch_size() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=384, decode_in_thread=False)
    assert engine.bundle.defaults.width == engine.bundle.defaults.height == 512
    assert engine.served_model.default_size == (384, 384)
    [result] = engine.generate([GenerationRequest("a", steps=1)])
    assert result.ok and result.image is not None and result.image.size == (384, 384)


@pytest.mark.parametrize(
    ("option", "value"), [("max_running", "4"), ("max_waiting", 2.0), ("slo_scale", "5"), ("pause", 1)]
)
def test_an_option_of_the_wrong_type_is_refused_by_name(option: str, value: object) -> None:
    with pytest.raises(InvalidRequestError) as err:
        Engine.from_model("tiny-sdxl", **{option: value})
    assert err.value.field == option and repr(value) in str(err.value)


def test_generate_queues_all_or_nothing_and_any_number_beyond_the_queue() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=64, max_waiting=2, decode_in_thread=False)
    good = [GenerationRequest(f"p{i}", width=64, height=64, steps=1, seed=i) for i in range(5)]
    with pytest.raises(InvalidRequestError):
        engine.generate([*good[:2], GenerationRequest("bad", width=96, height=64)])
    assert engine.num_waiting == 0 and not engine.has_work()  # the good two were not queued
    results = engine.generate(good)  # five through a queue of two, the caller driving the loop
    assert [r.params.seed for r in results] == [0, 1, 2, 3, 4] and all(r.ok for r in results)


def test_a_full_queue_refuses_new_requests() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=64, max_waiting=2)
    try:
        engine.submit(GenerationRequest("a", width=64, height=64, steps=1))
        engine.submit(GenerationRequest("b", width=64, height=64, steps=1))
        with pytest.raises(QueueFullError):
            engine.submit(GenerationRequest("c", width=64, height=64, steps=1))
    finally:
        engine.stop()


def test_image_level_execution_with_resolution_batches_equals_reference() -> None:
    engine = Engine.from_model(
        "tiny-sdxl", patch_size=64, execution="image", policy="res-fcfs", decode_in_thread=False
    )
    try:
        for g, r in zip(MIXED, engine.generate(MIXED), strict=True):
            assert_matches_reference("tiny-sdxl", g, r)
    finally:
        engine.stop()


@pytest.mark.parametrize(("execution", "policy"), [("patched", "fcfs"), ("image", "res-fcfs")])
def test_two_streams_equal_reference(execution: str, policy: str) -> None:
    engine = Engine.from_model(
        "tiny-sdxl", patch_size=64, execution=execution, policy=policy, streams=2, decode_in_thread=False
    )
    try:
        assert engine.model.streams == 2 and getattr(engine.batch, "streams", 2) == 2
        for g, r in zip(MIXED, engine.generate(MIXED), strict=True):
            assert_matches_reference("tiny-sdxl", g, r)
    finally:
        engine.stop()


def test_a_bad_stream_count_is_refused() -> None:
    with pytest.raises(InvalidRequestError, match="streams"):
        Engine.from_model("tiny-sdxl", streams=0)


def test_resolution_batching_never_mixes_resolutions() -> None:
    engine = Engine.from_model(
        "tiny-sdxl", patch_size=64, execution="image", policy="res-fcfs", decode_in_thread=False
    )
    try:
        for g in MIXED:
            engine.submit(g)
        while engine.has_work():
            engine.step()
            assert len({r.resolution for r in engine.scheduler.running}) <= 1
    finally:
        engine.stop()


def test_patch_cache_reuses_and_stays_close_to_exact() -> None:
    from patchedserve.patch import PatchCacheConfig

    reqs = [
        GenerationRequest("a red fox", width=128, height=128, steps=12, seed=1),
        GenerationRequest("a dog", width=128, height=64, steps=12, seed=2),
    ]
    exact = Engine.from_model("tiny-sdxl", patch_size=64, decode_in_thread=False).generate(reqs)
    off = Engine.from_model(
        "tiny-sdxl", patch_size=64, decode_in_thread=False, patch_cache=PatchCacheConfig(threshold=0.0)
    )
    for a, b in zip(off.generate(reqs), exact, strict=True):  # never reusing: the exact images
        assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    on = Engine.from_model(
        "tiny-sdxl", patch_size=64, decode_in_thread=False, patch_cache=PatchCacheConfig(threshold=0.05)
    )
    results = on.generate(reqs)
    assert on.model.cache is not None and on.model.cache.stats.reuse_fraction > 0.1
    for a, b in zip(results, exact, strict=True):
        mse = np.mean((np.asarray(a.image, dtype=np.float64) - np.asarray(b.image, dtype=np.float64)) ** 2)
        assert mse > 0 and 10 * np.log10(255**2 / mse) > 40  # approximate, but close (PSNR dB)
    with pytest.raises(InvalidRequestError, match="patched execution"):
        Engine.from_model("tiny-sdxl", execution="image", patch_cache=PatchCacheConfig())


def _nirvana_engine(similarity: str = "model") -> Engine:
    """The nirvana baseline's engine: image-level, same-resolution batches, approximate cache."""
    return Engine.from_model(
        "tiny-sdxl",
        patch_size=64,
        execution="image",
        policy="res-fcfs",
        approx_cache=True,
        approx_cache_similarity=similarity,
        decode_in_thread=False,
    )


def test_approximate_cache_skips_steps_for_a_repeated_prompt() -> None:
    engine = _nirvana_engine()
    g = GenerationRequest("a lighthouse at dusk", width=64, height=64, steps=6, seed=1)
    try:
        first = engine.generate([g])[0]
        futures = [engine.submit(GenerationRequest(g.prompt, width=64, height=64, steps=6, seed=2))]
        engine.step()  # admission: the cache moves the request to a later step
        started_at = engine.scheduler.running[0].step_index - 1
        while engine.has_work():
            engine.step()
        second = futures[0].result(timeout=0)
    finally:
        engine.stop()
    assert first.ok and second.ok
    assert engine.approx_cache is not None and engine.approx_cache.hits == 1
    assert started_at == 3  # identical prompt: the top tier skips half of the 6 steps


@pytest.mark.parametrize(("similarity", "hits"), [("exact", 1), ("model", 2)])
def test_exact_similarity_hits_on_repeats_only(similarity: str, hits: int) -> None:
    engine = _nirvana_engine(similarity)
    try:
        for prompt in ("a lighthouse at dusk", "a bowl of ramen", "a lighthouse at dusk"):
            engine.generate([GenerationRequest(prompt, width=64, height=64, steps=6, seed=1)])
    finally:
        engine.stop()
    # the random-weight text encoder makes two unrelated prompts similar enough to hit
    assert engine.approx_cache is not None and engine.approx_cache.hits == hits


def test_cancelling_the_awaiting_task_cancels_the_request() -> None:
    import asyncio

    engine = Engine.from_model("tiny-sdxl", patch_size=64)
    engine.start()

    async def scenario() -> None:
        task = asyncio.ensure_future(
            engine.agenerate(GenerationRequest("long", width=64, height=64, steps=400))
        )
        for _ in range(6000):  # at most a minute for the request to start
            if engine.scheduler.num_running or task.done():
                break
            await asyncio.sleep(0.01)
        assert engine.scheduler.num_running == 1, "the request never started"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(6000):
            if engine.scheduler.num_running == 0:
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the request kept running after its task was cancelled")

    try:
        asyncio.run(scenario())
    finally:
        engine.stop()


def test_stop_answers_every_request_it_holds_and_start_serves_again() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=64)
    queued = engine.submit(GenerationRequest("never run", width=64, height=64, steps=2, seed=1))
    engine.stop()  # the loop never ran: the request is still in the inbox
    result = queued.result(timeout=0)
    assert result.status == RequestStatus.CANCELLED and result.error == "engine stopped"
    with engine:  # starts again: a fresh decode worker replaces the one stop shut down
        later = GenerationRequest("after a restart", width=64, height=64, steps=2, seed=2)
        assert_matches_reference("tiny-sdxl", later, engine.submit(later).result(timeout=120))
    left = engine.submit(later)  # the block's end stopped the loop: nothing runs it
    time.sleep(0.3)
    assert not left.done()
    engine.stop()
    assert left.result(timeout=0).status == RequestStatus.CANCELLED


def test_a_request_cancelled_while_it_waits_for_the_decode_worker_is_not_decoded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import threading

    import patchedserve.engine.engine as engine_module

    decoded: list[int] = []
    real = engine_module.decode_latents

    def recorded(bundle, latents):  # type: ignore[no-untyped-def]
        decoded.append(latents.shape[-1])
        return real(bundle, latents)

    monkeypatch.setattr(engine_module, "decode_latents", recorded)
    engine = Engine.from_model("tiny-sdxl", patch_size=64)  # FCFS: every decode on the worker
    gate, busy = threading.Event(), threading.Event()
    try:
        assert engine._decoder is not None
        engine._decoder.submit(0.0, lambda: (busy.set(), gate.wait(60)))  # hold the worker
        assert busy.wait(10)
        future = engine.submit(GenerationRequest("p", width=64, height=64, steps=1, seed=1))
        while engine.has_work():
            engine.step()  # denoised: now queued behind the held job
        assert not future.done()
        engine.cancel(future.request_id)  # type: ignore[attr-defined]
    finally:
        gate.set()
        engine.stop()
    result = future.result(timeout=0)
    assert result.status == RequestStatus.CANCELLED and result.image is None
    assert decoded == []


def test_a_raising_observer_or_decode_job_loses_no_request() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=64)

    class Broken:
        def on_step(self, *args: object) -> None:
            raise RuntimeError("observer bug")

        def on_result(self, *args: object) -> None:
            raise RuntimeError("observer bug")

    engine.observers.append(Broken())  # type: ignore[arg-type]
    try:
        assert engine._decoder is not None
        engine._decoder.submit(0.0, lambda: 1 / 0)  # a job that raises must not end the worker
        g = GenerationRequest("p", width=64, height=64, steps=2, seed=3)
        future = engine.submit(g)
        while engine.has_work():
            engine.step()
        result = future.result(timeout=60)  # decoded on the worker
    finally:
        engine.stop()
    assert_matches_reference("tiny-sdxl", g, result)


def test_a_group_is_queued_whole_or_not_at_all() -> None:
    engine = Engine.from_model("tiny-sdxl", patch_size=64, max_waiting=3)
    g = GenerationRequest("a", width=64, height=64, steps=1)
    try:
        with pytest.raises(InvalidRequestError) as err:
            engine.submit_many([g] * 4)  # can never fit: not a retry-later
        assert err.value.field == "n"
        engine.submit_many([g, g])
        with pytest.raises(QueueFullError):
            engine.submit_many([g, g])  # fits in an empty queue, not beside the two queued
        assert engine.scheduler.num_waiting + len(engine.submitted()) == 2  # nothing of it was queued
        with pytest.raises(InvalidRequestError) as err:
            engine.submit_many([g, GenerationRequest("b", width=96, height=64)])
        assert err.value.field == "size" and len(engine.submitted()) == 2
    finally:
        engine.stop()


@pytest.mark.parametrize("device", ["gpu", "cuda:7", "meta"])
def test_a_device_this_machine_lacks_is_refused_by_name(device: str) -> None:
    import torch

    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has an eighth GPU")
    with pytest.raises(InvalidRequestError) as err:
        Engine.from_model("tiny-sdxl", device=device)
    assert err.value.field == "device" and device in str(err.value)
