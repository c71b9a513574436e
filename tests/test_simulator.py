"""The simulator: virtual time with the engine's own policies, the dispatcher, and its speed.

A synthetic profile (round numbers) prices steps, so expected latencies can be written down.
"""

from __future__ import annotations

import math
import random
import statistics
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from patchedserve.bench.metrics import STATUSES, RequestOutcome, summarize
from patchedserve.bench.systems import SYSTEMS, objectives_s
from patchedserve.bench.traces import TraceConfig, TraceRequest, make_trace
from patchedserve.cluster.costs import MachineCosts, cost_model
from patchedserve.cluster.dispatch import LeastLoadDispatcher
from patchedserve.cluster.simulator import ModelEmbedder, SimConfig, build_replicas, exact_embedder, simulate
from patchedserve.cluster.speed import Busy, SpeedTrace, admission_gap_s, decode_phases
from patchedserve.errors import InvalidRequestError
from patchedserve.request import RequestStatus
from patchedserve.scheduler import FCFSScheduler, LatencyPredictor, Overhead, SLOScheduler
from patchedserve.scheduler.resbatch import ResolutionBatchScheduler

COEF = (0.010, 0.004, 0.0005, 0.001, 0.0005, 0.0005, 0.002, 0.001)
"""Seconds per feature (bias, patch, patch² of attention, entry, request, CFG request, resolution, group)."""


def profile(scale: float = 1.0) -> LatencyPredictor:
    overhead = Overhead(encode_s=0.005, decode_base_s=0.01, decode_s_per_mpx=0.2)
    return LatencyPredictor(coef=tuple(c * scale for c in COEF), patch_size=256, overhead=overhead)


def req(
    arrival_s: float, size: int = 512, steps: int = 10, prompt: str = "p", slo: float = 5.0
) -> TraceRequest:
    return TraceRequest(arrival_s, prompt, size, size, steps, 5.0, 0, slo)


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_a_request_alone_takes_its_predicted_standalone_latency(system: str) -> None:
    p = profile()
    r = req(2.0, size=512, steps=10)
    [outcome] = simulate([r], objectives_s([r], p), SYSTEMS[system], p, MachineCosts(image=p))
    assert outcome.status == "finished"
    assert outcome.latency_s == pytest.approx(p.predict_standalone(512, 512, 10, True, corrected=False))


def test_outcomes_split_a_latency_into_denoising_and_decode() -> None:
    p = profile()
    r = req(2.0, size=512, steps=10)
    [outcome] = simulate([r], objectives_s([r], p), SYSTEMS["patchedserve"], p, MachineCosts(image=p))
    assert outcome.latency_s is not None and outcome.denoised_s is not None
    # Alone, the decode starts when denoising ends and takes the profile's decode time.
    assert outcome.latency_s - outcome.denoised_s == pytest.approx(p.overhead.decode_s(512, 512))


@pytest.mark.parametrize("system", list(SYSTEMS))
def test_the_machine_costs_are_the_calibrated_ones(system: str) -> None:
    p = profile()
    costs = MachineCosts(image=profile(1.3), patched=profile(1.1))  # what the machine really spends
    r = req(2.0, size=512, steps=10)
    [outcome] = simulate([r], objectives_s([r], p), SYSTEMS[system], p, costs)
    step = costs.image if SYSTEMS[system].execution == "image" else costs.patched
    assert step is not None
    solo_s = step.solo_step_s((512, 512, True), corrected=False)
    expected = p.overhead.encode_s + 10 * solo_s + p.overhead.decode_s(512, 512)
    assert outcome.latency_s == pytest.approx(expected, rel=1e-9)


def test_patch_cache_systems_pay_the_measured_cache_factor() -> None:
    p = profile()
    costs = MachineCosts(image=p, patched=profile(1.1), patch_cache_factor=0.75)
    r = req(2.0, size=512, steps=10)
    solo_s = profile(1.1).solo_step_s((512, 512, True), corrected=False)
    overhead_s = p.overhead.encode_s + p.overhead.decode_s(512, 512)
    for name, factor in (("patched-fcfs", 1.0), ("mixed-cache", 0.75), ("patchedserve-cache", 0.75)):
        [outcome] = simulate([r], objectives_s([r], p), SYSTEMS[name], p, costs)
        assert outcome.latency_s == pytest.approx(overhead_s + 10 * factor * solo_s, rel=1e-9)
    unmeasured = cost_model("patched", p, MachineCosts(), patch_cache=True)
    assert unmeasured.cache_factor == 1.0  # not measured: priced as exact


def test_the_policies_are_the_engine_objects() -> None:
    p = profile()
    kinds = {
        "image-fcfs": FCFSScheduler,
        "res-batch": ResolutionBatchScheduler,
        "nirvana": ResolutionBatchScheduler,
        "patched-fcfs": FCFSScheduler,
        "patchedserve": SLOScheduler,
    }
    for name, cls in kinds.items():
        [replica] = build_replicas(SYSTEMS[name], p, MachineCosts(image=p), SimConfig(), exact_embedder())
        assert type(replica.scheduler) is cls
        assert replica.scheduler.max_running == (1 if name == "image-fcfs" else 12)
        assert (replica.approx_cache is not None) == (name == "nirvana")


def test_batching_shares_steps_in_virtual_time() -> None:
    p = profile()
    both = [req(0.0, 256, 10, "a"), req(0.0, 512, 10, "b")]
    serial = simulate(both, [100.0, 100.0], SYSTEMS["image-fcfs"], p, MachineCosts(image=p))
    batched = simulate(both, [100.0, 100.0], SYSTEMS["patched-fcfs"], p, MachineCosts(image=p))
    # One at a time, the second waits for the first; batched, both finish after 10 shared steps.
    assert serial[1].latency_s is not None and batched[1].latency_s is not None
    assert batched[1].latency_s < serial[1].latency_s


def test_dispatcher_balances_equal_requests_over_replicas() -> None:
    p = profile()
    trace = [req(0.001 * i, 512, 10, f"p{i}") for i in range(40)]
    config = SimConfig(replicas=4)
    replicas = build_replicas(SYSTEMS["patchedserve"], p, MachineCosts(), config, None)
    dispatcher = LeastLoadDispatcher(p)
    from patchedserve.cluster.simulator import _request

    for i, r in enumerate(trace):
        replicas[dispatcher.choose(replicas)].submit(_request(i, r, 100.0, 256), r.arrival_s)
    assert sorted(dispatcher.assigned.count(k) for k in range(4)) == [10, 10, 10, 10]
    assert dispatcher.assigned[:4] == [0, 1, 2, 3]


@pytest.mark.parametrize("system", ["patchedserve", "res-batch", "nirvana"])
def test_a_replica_prices_its_queue_once_and_its_load_stays_the_sum_over_its_requests(system: str) -> None:
    from patchedserve.cluster.dispatch import remaining_work_s
    from patchedserve.cluster.simulator import _request

    p = profile()
    (replica,) = build_replicas(SYSTEMS[system], p, MachineCosts(image=p), SimConfig(), exact_embedder())
    dispatcher = LeastLoadDispatcher(p)
    # Tight objectives for the large requests, so the slo policy refuses some of them.
    trace = [req(0.05 * i, (256, 512)[i % 2], 10, f"p{i % 7}") for i in range(60)]
    requests = [_request(i, r, 1.0 if r.width == 512 else 100.0, 256) for i, r in enumerate(trace)]
    now_s, seen = 0.0, set()
    for i, r in enumerate(requests):
        replica.submit(r, r.arrival_s)
        if i % 3 == 2:  # a step now and then: admissions, drops, finished requests
            now_s = max(now_s, r.arrival_s)
            replica.iterate(now_s)
            now_s = replica.next_s or now_s
        brute_s = sum(remaining_work_s(x, p) for x in replica.outstanding())
        assert replica.outstanding_work_s(dispatcher.work_of) == pytest.approx(brute_s, rel=1e-12)
        seen |= {x.status for x in requests}
    assert RequestStatus.RUNNING in seen and RequestStatus.FINISHED in seen
    if system == "patchedserve":
        assert RequestStatus.DROPPED in seen


def test_more_replicas_serve_an_overload_better() -> None:
    p = profile()
    trace = make_trace(TraceConfig(qps=5.0, duration_s=60.0, sizes=((512, 512),), steps=(10,), seed=1))
    objectives = objectives_s(trace, p)
    one = summarize(simulate(trace, objectives, SYSTEMS["patchedserve"], p), 60.0)
    four = summarize(
        simulate(trace, objectives, SYSTEMS["patchedserve"], p, config=SimConfig(replicas=4)), 60.0
    )
    assert one["slo_satisfaction"] < 0.9 < four["slo_satisfaction"]


def test_slo_policy_drops_what_fcfs_lets_miss() -> None:
    p = profile()
    trace = make_trace(TraceConfig(qps=10.0, duration_s=30.0, steps=(10,), seed=2))
    objectives = objectives_s(trace, p)
    fcfs = summarize(simulate(trace, objectives, SYSTEMS["patched-fcfs"], p), 30.0)
    slo = summarize(simulate(trace, objectives, SYSTEMS["patchedserve"], p), 30.0)
    assert fcfs["drop_rate"] == 0.0 and slo["drop_rate"] > 0.0
    assert slo["slo_satisfaction"] >= fcfs["slo_satisfaction"]


def test_nirvana_skips_steps_for_repeated_prompts() -> None:
    p = profile()
    first, again = req(0.0, 512, 10, "same"), req(5.0, 512, 10, "same")
    other = replace(again, prompt="different")
    spec = SYSTEMS["nirvana"]
    hit = simulate([first, again], [100.0, 100.0], spec, p, MachineCosts(image=p), embed=exact_embedder())
    miss = simulate([first, other], [100.0, 100.0], spec, p, MachineCosts(image=p), embed=exact_embedder())
    assert hit[1].latency_s is not None and miss[1].latency_s is not None
    solo = p.solo_step_s((512, 512, True), corrected=False)
    assert miss[1].latency_s - hit[1].latency_s == pytest.approx(5 * solo)  # tier 0.95: half the steps


def test_thousands_of_requests_are_each_accounted_for_and_replicas_scale() -> None:
    p = profile()
    trace = make_trace(TraceConfig(qps=40.0, duration_s=100.0, steps=(10,), seed=3))
    assert len(trace) > 3000
    objectives = objectives_s(trace, p)
    met = {}
    for name, replicas in (("patchedserve", 1), ("patchedserve", 4), ("res-batch", 4)):
        outcomes = simulate(
            trace, objectives, SYSTEMS[name], p, MachineCosts(image=p), config=SimConfig(replicas=replicas)
        )
        assert [o.index for o in outcomes] == list(range(len(trace)))
        assert {o.status for o in outcomes} <= set(STATUSES)
        for o in outcomes:
            if o.status == "finished":
                assert o.latency_s is not None and o.denoised_s is not None
                assert o.latency_s >= o.denoised_s > 0.0
            else:
                assert o.latency_s is None
        met[name, replicas] = sum(o.met for o in outcomes)
    # Overloaded 40 req/s: four engines meet well over three times the deadlines one engine does.
    assert met["patchedserve", 4] > 3 * met["patchedserve", 1] > 0


def test_speed_trace_reads_the_machine_off_logged_steps() -> None:
    p = profile()
    cost = cost_model("patched", p, MachineCosts())
    entries = [(512, 512, True), (256, 256, True)]
    modelled_s = cost.base_step_s(entries)
    # 0-10 s twice as slow as modelled, 10-15 s nothing ran, 15-20 s as modelled.
    steps = [(t, 2.0 * modelled_s, entries) for t in (0.5, 3.0, 7.0, 9.9)] + [(16.0, modelled_s, entries)]
    speed = SpeedTrace.from_steps(steps, cost, bucket_s=5.0)
    assert speed.factors == pytest.approx((2.0, 2.0, 2.0, 1.0))  # the gap keeps the last known speed
    assert speed(-1.0) == 2.0 and speed(100.0) == 1.0
    r = req(0.0, size=512, steps=10)
    fast = simulate([r], [100.0], SYSTEMS["patched-fcfs"], p)
    slow = simulate([r], [100.0], SYSTEMS["patched-fcfs"], p, replace(MachineCosts(), speed=speed))
    assert slow[0].latency_s == pytest.approx(2.0 * (fast[0].latency_s or 0.0))


def test_speed_trace_of_a_cached_system_is_relative_to_its_cached_cost() -> None:
    """The cache's saving is in the cost model; the speed trace must not count it a second time."""
    p = profile()
    costs = MachineCosts(patch_cache_factor=0.6)
    cached = cost_model("patched", p, costs, patch_cache=True)
    entries = [(512, 512, True)]
    # A machine running exactly as calibrated: every cached step takes 0.6 x the exact cost.
    steps = [(t, 0.6 * cached.base_step_s(entries), entries) for t in (0.5, 6.0)]
    assert SpeedTrace.from_steps(steps, cached, bucket_s=5.0).factors == pytest.approx((1.0, 1.0))
    exact = cost_model("patched", p, costs)
    assert SpeedTrace.from_steps(steps, exact, bucket_s=5.0).factors == pytest.approx((0.6, 0.6))


def test_admission_time_is_read_off_the_gaps_before_steps_that_only_added_requests() -> None:
    a, b = (512, 512, True), (256, 256, True)
    steps = [
        (0.0, 0.1, [a]),
        (0.112, 0.1, [a, b]),  # b joined after a 12 ms gap
        (0.213, 0.1, [a, b]),  # no change: 1 ms of bookkeeping, not admission
        (0.333, 0.1, [a, b, b, a]),  # two joined in 20 ms: 10 ms each
        (0.434, 0.1, [b]),  # requests left: a retirement, not counted
        (0.6, 0.1, [b, a]),  # a joined after a slow 66 ms admission
        (5.0, 0.1, [b, a, a]),  # the loop idled: not admission work
    ]
    # Per newcomer: 12, 10 and 66 ms; the median is the typical admission.
    assert admission_gap_s(steps) == pytest.approx(0.012)
    assert admission_gap_s(steps[:1]) is None
    assert admission_gap_s([(0.0, 0.1, [a]), (0.2, 0.1, [b])]) is None  # a swap, no pure join


def test_a_request_back_from_a_pause_is_no_newcomer() -> None:
    a, b = (256, 256, True), (512, 512, True)
    steps = [
        (0.0, 0.1, [a, b]),
        (0.101, 0.1, [a]),  # request 2 sits out
        (0.202, 0.1, [a, b]),  # request 2 steps again after 1 ms: no admission
        (0.322, 0.1, [a, b, a]),  # request 3 joins after 20 ms
    ]
    ids = [[1, 2], [1], [1, 2], [1, 2, 3]]
    assert admission_gap_s(steps, ids) == pytest.approx(0.020)
    # From the sizes alone request 2 looks new, and its 1 ms counts as an admission.
    assert admission_gap_s(steps) == pytest.approx((0.001 + 0.020) / 2)


def test_replicas_admission_gaps_are_read_within_each_replicas_steps() -> None:
    a = (256, 256, True)
    # Two replicas' steps interleaved in time: each joins a request after its own 20 ms gap.
    steps = [
        (0.0, 0.1, [a]),  # replica 0, request 0
        (0.05, 0.1, [a]),  # replica 1, request 1
        (0.12, 0.1, [a, a]),  # replica 0: request 2 joined 20 ms after its last step
        (0.17, 0.1, [a, a]),  # replica 1: request 3 likewise
    ]
    ids, replica = [[0], [1], [0, 2], [1, 3]], [0, 1, 0, 1]
    cost = cost_model("patched", profile(), MachineCosts())
    assert SpeedTrace.from_steps(steps, cost, ids=ids, replica=replica).admission_s == pytest.approx(0.020)
    # Read as one engine's log, no step adds to the one before: no gap is found.
    assert SpeedTrace.from_steps(steps, cost, ids=ids).admission_s is None


def test_a_measured_admission_time_replaces_the_profiles_encode_cost() -> None:
    p = profile()
    r = req(2.0, size=512, steps=10)
    for admission_s in (None, 0.05):
        costs = MachineCosts(image=p, admission_s=admission_s)
        [outcome] = simulate([r], objectives_s([r], p), SYSTEMS["patchedserve"], p, costs)
        encode_s = p.overhead.encode_s if admission_s is None else admission_s
        alone_s = p.predict_standalone(512, 512, 10, True, corrected=False)
        assert outcome.latency_s == pytest.approx(alone_s - p.overhead.encode_s + encode_s)
    # A speed trace carries it from a real run's log, at that run's speed (no factor on top).
    entries = [(512, 512, True)]
    logged = [(0.0, 0.2, entries), (0.23, 0.2, entries * 2)]
    speed = SpeedTrace.from_steps(logged, cost_model("patched", p, MachineCosts()), bucket_s=5.0)
    assert speed.admission_s == pytest.approx(0.03)
    cost = cost_model("patched", p, replace(MachineCosts(), speed=speed, admission_s=speed.admission_s))
    assert cost.encode_s(2, now_s=0.0) == pytest.approx(0.06)


def test_a_running_decode_slows_the_step_it_overlaps() -> None:
    cost = replace(cost_model("patched", profile(), MachineCosts()), decode_interference=0.5)
    assert cost.step_with_decode_s(0.2, start_s=0.0, decoder_free_s=1.0) == pytest.approx(0.4)
    assert cost.step_with_decode_s(1.0, start_s=0.0, decoder_free_s=1.0) == pytest.approx(1.5)
    assert cost.step_with_decode_s(1.0, start_s=2.0, decoder_free_s=1.0) == pytest.approx(1.0)
    serial = replace(cost, decode_interference=1.0)  # decode and denoise cannot overlap at all
    assert serial.step_with_decode_s(0.3, start_s=0.0, decoder_free_s=0.5) == pytest.approx(0.8)


def test_speed_trace_takes_steps_net_of_the_decodes_they_overlapped() -> None:
    """A machine at its calibrated speed whose steps some decodes slowed: net of those decodes
    the speed is 1, with neither speed nor noise left over; read with the decodes inside, the
    buckets that held decodes look slow."""
    p = profile()
    cost = replace(cost_model("patched", p, MachineCosts()), decode_interference=0.4)
    entries = [(512, 512, True), (256, 256, True)]
    step_s = cost.base_step_s(entries)
    rng = random.Random(3)
    steps, decoding, now_s, free_s = [], [], 0.0, 0.0
    while now_s < 20.0:
        if now_s < 10.0 and now_s >= free_s and rng.random() < 0.3:  # a decode starts here
            decoding.append((now_s, now_s + rng.uniform(0.5, 3.0) * step_s))
            free_s = decoding[-1][1]
        latency_s = cost.step_with_decode_s(step_s, now_s, free_s)
        steps.append((now_s, latency_s, entries))
        now_s += latency_s
    assert any(a < s < b for a, b in decoding for s, _, _ in steps)  # some steps began mid-decode
    net = SpeedTrace.from_steps(steps, cost, bucket_s=5.0, decoding=decoding)
    assert net.factors == pytest.approx((1.0,) * len(net.factors))
    assert net.noise == pytest.approx(0.0, abs=1e-9)
    assert net.decode_interference == 0.4
    inside = SpeedTrace.from_steps(steps, cost, bucket_s=5.0)
    assert inside.decode_interference is None
    assert min(inside.factors[:2]) > 1.1 and inside.factors[-1] == pytest.approx(1.0)
    # Overlapping decode phases (one waiting on the worker behind another) count once.
    doubled = SpeedTrace.from_steps(steps, cost, bucket_s=5.0, decoding=decoding + decoding)
    assert doubled.factors == pytest.approx(net.factors)


def test_decode_phases_are_the_finished_requests_and_count_once_where_they_overlap() -> None:
    outcomes = [
        RequestOutcome(0, "256x256", 1.0, "finished", 2.0, 5.0, denoised_s=1.5),  # decodes 2.5-3.0
        RequestOutcome(1, "256x256", 1.25, "finished", 2.25, 5.0, denoised_s=1.25),  # waits: 2.5-3.5
        RequestOutcome(2, "512x512", 2.0, "dropped", None, 5.0),
        RequestOutcome(3, "512x512", 2.0, "cancelled", None, 5.0),
    ]
    phases = decode_phases(outcomes)
    assert phases == [(2.5, 3.0), (2.5, 3.5)]
    busy = Busy([*phases, (6.0, 7.0)])
    assert busy.overlap_s(0.0, 10.0) == pytest.approx(1.0 + 1.0)
    assert busy.overlap_s(3.0, 6.5) == pytest.approx(0.5 + 0.5)
    assert busy.overlap_s(4.0, 5.0) == 0.0


def test_speed_trace_measures_the_step_to_step_noise_its_buckets_average_away() -> None:
    p = profile()
    cost = cost_model("patched", p, MachineCosts())
    entries = [(512, 512, True)]
    modelled_s = cost.base_step_s(entries)
    rng = random.Random(0)
    noisy = [(0.01 * i, modelled_s * math.exp(rng.gauss(0.0, 0.2)), entries) for i in range(2000)]
    assert SpeedTrace.from_steps(noisy, cost, bucket_s=5.0).noise == pytest.approx(0.2, rel=0.1)
    # A slowdown that lasts a whole bucket is speed, not noise.
    steady = [(t, (2.0 if t < 5.0 else 1.0) * modelled_s, entries) for t in (0.5, 1.0, 6.0, 7.0)]
    assert SpeedTrace.from_steps(steady, cost, bucket_s=5.0).noise == pytest.approx(0.0, abs=1e-12)


def test_step_noise_weighs_each_step_by_its_modelled_time() -> None:
    p = profile()
    cost = cost_model("patched", p, MachineCosts())
    large, small = [(512, 512, True)] * 4, [(256, 256, False)]
    large_s, small_s = cost.base_step_s(large), cost.base_step_s(small)
    assert large_s > 5 * small_s
    rng = random.Random(2)
    # Steady large steps and wildly jittering small ones, alternating within each bucket.
    steps = []
    for i in range(2000):
        if i % 2:
            steps.append((0.01 * i, small_s * math.exp(rng.gauss(0.0, 0.8)), small))
        else:
            steps.append((0.01 * i, large_s, large))
    noise = SpeedTrace.from_steps(steps, cost, bucket_s=5.0).noise
    # Counted per step the spread would be about 0.55; weighed by time the small steps' share
    # (small_s / (small_s + large_s)) bounds it.
    share = small_s / (small_s + large_s)
    assert 0.0 < noise < 0.8 * math.sqrt(share) + 0.05
    assert noise < 0.35


def test_step_noise_jitters_each_step_around_the_model_with_mean_one() -> None:
    cost = replace(cost_model("patched", profile(), MachineCosts()), step_noise=0.3)
    rng = random.Random(1)
    draws = [cost.jitter(rng) for _ in range(20000)]
    assert statistics.fmean(draws) == pytest.approx(1.0, abs=0.01)
    assert statistics.pstdev([math.log(d) for d in draws]) == pytest.approx(0.3, rel=0.05)
    assert cost_model("patched", profile(), MachineCosts()).jitter(rng) == 1.0
    p = profile()
    trace = make_trace(TraceConfig(qps=2.0, duration_s=20.0, sizes=((256, 256), (512, 512)), seed=3))
    objectives = objectives_s(trace, p)
    quiet = [o.latency_s for o in simulate(trace, objectives, SYSTEMS["patched-fcfs"], p)]
    noisy_costs = MachineCosts(step_noise=0.3)
    noisy = [o.latency_s for o in simulate(trace, objectives, SYSTEMS["patched-fcfs"], p, noisy_costs)]
    again = [o.latency_s for o in simulate(trace, objectives, SYSTEMS["patched-fcfs"], p, noisy_costs)]
    assert noisy == again  # seeded per replica: a simulation repeats exactly
    assert noisy != quiet


def test_cached_step_factor_weighs_each_request_by_its_share_of_the_step() -> None:
    from patchedserve.cluster.costs import cached_step_factor, step_ratio

    p = profile()
    big, small = (512, 512, True), (256, 256, True)
    assert cached_step_factor(p, [big], [0.3]) == pytest.approx(0.3)  # alone: its own ratio
    assert cached_step_factor(p, [big, small], [0.4, 0.4]) == pytest.approx(0.4)
    fixed_s = p.model_s(p.mix().vector())
    big_s, small_s = (p.model_s(p.mix([e]).vector()) - fixed_s for e in (big, small))
    # The small request computes, the big one reuses everything: the fixed cost runs in full.
    expected = (fixed_s + small_s + 0.1 * big_s) / (fixed_s + big_s + small_s)
    assert cached_step_factor(p, [big, small], [0.1, 1.0]) == pytest.approx(expected)
    profile8 = [1.0, 1.0, 1.0, 0.7, 0.1, 1.0, 0.1, 0.1]
    assert step_ratio(profile8, 4, 8) == 0.1
    assert step_ratio(profile8, 2, 4) == 0.1  # halfway through a 4-step trajectory
    assert step_ratio(profile8, 30, 8) == 0.1  # past the end: the last step's


def test_a_cached_request_pays_its_per_step_profile_in_virtual_time() -> None:
    p = profile()
    steps_profile = (1.0, 0.5, 0.1, 0.1)
    costs = MachineCosts(image=p, patched=p, patch_cache_factor=0.9, patch_cache_steps=steps_profile)
    r = req(2.0, size=512, steps=4)
    [outcome] = simulate([r], objectives_s([r], p), SYSTEMS["patchedserve-cache"], p, costs)
    solo_s = p.solo_step_s((512, 512, True), corrected=False)
    overhead_s = p.overhead.encode_s + p.overhead.decode_s(512, 512)
    assert outcome.latency_s == pytest.approx(overhead_s + sum(steps_profile) * solo_s, rel=1e-9)
    exact = cost_model("patched", p, costs)
    assert exact.cache_steps == () and exact.cache_factor == 1.0


def test_step_indices_are_read_off_a_log_in_admission_order() -> None:
    from patchedserve.cluster.speed import infer_progress

    a, b = (512, 512, True), (256, 256, True)
    log = [(0.0, 0.1, [a]), (0.1, 0.1, [a, b]), (0.2, 0.1, [b, a]), (0.3, 0.1, [a])]
    assert infer_progress(log, 2) == [[(0, 2)], [(1, 2), (0, 2)], [(1, 2), (0, 2)], [(1, 2)]]
    # A request that leaves before its last step (a NIRVANA hit started it later) breaks the pattern.
    assert infer_progress([(0.0, 0.1, [a, b]), (0.1, 0.1, [b])], 3) is None
    # A cached system's speed is then measured against its per-step cost.
    cached = cost_model("patched", profile(), MachineCosts(patch_cache_steps=(1.0, 0.2)), patch_cache=True)
    steps = [(t, cached.base_step_s([a]) * r, [a]) for t, r in ((0.5, 1.0), (1.0, 0.2))]
    progress = infer_progress(steps, 2)
    assert SpeedTrace.from_steps(steps, cached, 5.0, progress).factors == pytest.approx((1.0,))


def test_noise_seeds_pool_independent_jitter_draws_into_the_expected_figures() -> None:
    from patchedserve.cluster.sweep import simulate_traces

    p = profile()
    trace = make_trace(TraceConfig(qps=6.0, duration_s=10.0, sizes=((256, 256), (512, 512)), seed=5))
    traces = [(6.0, 5.0, trace, 10.0, Path("unused.jsonl"))]
    systems = [SYSTEMS["patched-fcfs"]]
    noisy = MachineCosts(step_noise=0.4)
    [run] = simulate_traces(traces, systems, p, noisy, SimConfig(), noise_seeds=4)
    assert run["noise_seeds"] == 4 and len(run["seed_satisfaction"]) == 4
    assert len(set(run["seed_satisfaction"])) > 1  # the seeds draw different jitter
    assert run["slo_satisfaction"] == pytest.approx(statistics.fmean(run["seed_satisfaction"]))
    assert run["requests"] == 4 * len(trace) and run["duration_s"] == 10.0
    [quiet] = simulate_traces(traces, systems, p, MachineCosts(), SimConfig(), noise_seeds=4)
    assert quiet["noise_seeds"] == 1  # without jitter every seed is the same run


def test_batch_level_is_what_staggered_cached_steps_cost_beyond_the_alone_profile() -> None:
    from patchedserve.cluster.calibrate import batch_level
    from patchedserve.cluster.costs import cached_step_factor

    p = profile()
    alone = [1.0, 0.5, 0.1]
    a, b = (512, 512, True), (256, 256, True)
    steps = [([a], [(0, 3)]), ([a, b], [(1, 3), (0, 3)]), ([a, b], [(2, 3), (1, 3)]), ([b], [(2, 3)])]
    paired = []
    for entries, progress in steps:
        exact_s = p.model_s(p.mix(entries).vector())
        priced = cached_step_factor(p, entries, [alone[k] for k, _ in progress])
        paired.append((entries, progress, exact_s, 1.25 * priced * exact_s))
    assert batch_level(p, alone, paired) == pytest.approx(1.25)


def test_a_decode_in_the_loop_holds_the_next_step_back() -> None:
    p = profile()
    # Both start in one batch (no reserve holds the lenient one back); the short one ends its
    # denoising with its deadline 1.5 decode times away, so the SLO policy decodes it in the loop
    # and the long one's next step waits for that decode.
    short, long = req(1.0, size=512, steps=2), req(1.0, size=512, steps=6)
    both_s = p.model_s(p.mix([(512, 512, True)] * 2).vector())
    solo_s = p.model_s(p.mix([(512, 512, True)]).vector())
    decode_s = p.overhead.decode_s(512, 512)
    short_end_s = 1.0 + 2 * p.overhead.encode_s + 2 * both_s  # two prompts encoded, two steps
    objectives = [short_end_s + 1.5 * decode_s - 1.0, 60.0]
    inline = replace(SYSTEMS["patchedserve"], reserve=False)
    for system, pause_s in ((inline, decode_s), (replace(inline, inline_decode=0.0), 0.0)):
        outcomes = simulate([short, long], objectives, system, p, MachineCosts(image=p))
        assert outcomes[0].denoised_s == pytest.approx(short_end_s - 1.0)
        assert outcomes[0].latency_s == pytest.approx(short_end_s + decode_s - 1.0)
        assert outcomes[1].denoised_s == pytest.approx(short_end_s + pause_s + 4 * solo_s - 1.0)


def test_a_request_the_busy_worker_would_make_late_is_decoded_in_the_loop() -> None:
    p = profile()
    costs = MachineCosts(image=p, decode_slowdown=2.0)
    system = replace(SYSTEMS["patchedserve"], reserve=False)
    big = req(0.0, size=1024, steps=1)
    [alone] = simulate([big], [60.0], system, p, costs)
    # Two requests arrive as the large image's decode starts on the worker; the short one ends its
    # denoising 0.2 s before its deadline, with most of that decode still ahead of it.
    short, long = req(alone.denoised_s, steps=1), req(alone.denoised_s, steps=10)
    denoised_s = simulate([big, short, long], [60.0] * 3, system, p, costs)[1].denoised_s
    decode_s = p.overhead.decode_s(512, 512)
    assert 2 * decode_s < 0.2  # an idle worker, even slowed beside the steps, would make it
    outcomes = simulate([big, short, long], [60.0, denoised_s + 0.2, 60.0], system, p, costs)
    assert outcomes[1].denoised_s == pytest.approx(denoised_s)
    assert outcomes[1].latency_s == pytest.approx(denoised_s + decode_s)  # in the loop, at full speed
    # Queued behind the large decode, it would have ended too late.
    worker_end_s = alone.latency_s + 2 * decode_s
    assert worker_end_s > denoised_s + 0.2


def test_a_worker_decode_beside_running_steps_takes_the_measured_slowdown() -> None:
    p = profile()
    # The short request's decode runs on the worker while the long one still has steps to run;
    # the long one's decode starts with the loop idle.
    short, long = req(1.0, size=512, steps=2), req(1.0, size=512, steps=6)
    decode_s = p.overhead.decode_s(512, 512)
    worker = replace(SYSTEMS["patchedserve"], reserve=False, inline_decode=0.0)
    costs = MachineCosts(image=p, decode_slowdown=2.0)
    outcomes = simulate([short, long], [60.0, 60.0], worker, p, costs)
    assert [o.status for o in outcomes] == ["finished", "finished"]
    assert outcomes[0].latency_s - outcomes[0].denoised_s == pytest.approx(2.0 * decode_s)
    assert outcomes[1].latency_s - outcomes[1].denoised_s == pytest.approx(decode_s)
    # Measured as not slowed (1, the default), the worker decodes at its time alone.
    plain = simulate([short, long], [60.0, 60.0], worker, p, MachineCosts(image=p))
    assert plain[0].latency_s - plain[0].denoised_s == pytest.approx(decode_s)


def test_cost_files_bring_their_measured_decode_contention(tmp_path: Path) -> None:
    p = profile()
    contention = {"decode_interference": 0.3, "decode_slowdown": 2.2}
    measured = p.save(tmp_path / "patched.json", {"meta": contention})
    costs = MachineCosts.load(None, measured)
    assert (costs.decode_interference, costs.decode_slowdown) == (0.3, 2.2)
    unmeasured = MachineCosts.load(None, p.save(tmp_path / "plain.json"))
    assert (unmeasured.decode_interference, unmeasured.decode_slowdown) == (0.0, 1.0)


def test_an_image_level_system_without_image_costs_is_refused_by_flag() -> None:
    with pytest.raises(InvalidRequestError) as err:
        cost_model("image", profile(), MachineCosts())
    assert err.value.field == "image_cost" and "--image-cost" in str(err.value)


@pytest.mark.parametrize(("system", "tighter_first"), [("patchedserve", True), ("patched-fcfs", False)])
def test_simulated_decodes_follow_the_policy_order(system: str, tighter_first: bool) -> None:
    p = profile()
    # The tight request joins one step after the lenient one and has one step fewer: they finish
    # together, the lenient one first in the batch.
    lenient, tight = req(1.0, size=512, steps=5), req(1.01, size=512, steps=4)
    outcomes = simulate([lenient, tight], [60.0, 30.0], SYSTEMS[system], p, MachineCosts(image=p))
    assert all(o.status == "finished" for o in outcomes)
    ends = [r.arrival_s + o.latency_s for r, o in zip((lenient, tight), outcomes, strict=True)]
    decode_s = p.overhead.decode_s(512, 512)
    # The worker decodes one at a time: the second waits for the first.
    assert ends[0] - ends[1] == pytest.approx(decode_s if tighter_first else -decode_s)


def test_calibration_times_the_two_executions_in_alternation(monkeypatch: pytest.MonkeyPatch) -> None:
    import patchedserve.cluster.calibrate as calibration
    from patchedserve.engine.image_batch import ImageBatch
    from patchedserve.models import load_model

    bundle = load_model("tiny-sdxl")
    config = calibration.Calibration(
        sizes=((64, 64), (128, 64)),
        batch_sizes=(1, 2),
        mixes=4,
        patch_size=64,
        repeats=1,
        steps=2,
        cache_mixes=1,
    )
    order: list[str] = []
    timed = calibration.time_steps

    def spy(bundle_: object, batch: object, requests: list) -> list[float]:  # type: ignore[type-arg]
        order.append("image" if isinstance(batch, ImageBatch) else "patched")
        return timed(bundle_, batch, requests)  # type: ignore[arg-type]

    monkeypatch.setattr(calibration, "time_steps", spy)
    costs = calibration.calibrate_all(bundle, ("image", "patched"), config)
    # 2 sizes x 2 batch sizes against 4 mixes, never two of one kind in a row; then the patched
    # path's extras (decode interference, the patch cache's steps).
    assert order[:8] == ["image", "patched"] * 4
    assert set(order[8:]) == {"patched"}
    assert {c.meta["execution"] for c in costs.values()} == {"image", "patched"}
    assert len(costs["image"].meta["samples"]) == 4
    assert {"decode_interference", "decode_slowdown"} <= costs["patched"].meta.keys()


def test_model_embedder_encodes_a_trace_in_batches_as_one_at_a_time() -> None:
    from patchedserve.models import encode_prompts, load_model

    bundle = load_model("tiny-sdxl")
    prompts = ["a red fox in snow", "a lighthouse at dusk", "", "a red fox in snow, oil painting"]
    embedder = ModelEmbedder(bundle, batch=3)  # two batches, the second of one prompt
    embedder.encode(prompts + prompts[:2])  # repeats are encoded once
    assert list(embedder.memo) == prompts
    for prompt in prompts:
        with torch.inference_mode():
            alone = encode_prompts(bundle, [prompt])[0].prompt_embeds.float().mean(0)  # [D]
        torch.testing.assert_close(embedder(prompt), alone, rtol=1e-5, atol=1e-6)
    assert not torch.equal(embedder(prompts[0]), embedder(prompts[1]))
    late = embedder("a prompt seen only on arrival")  # encoded on demand
    assert late.shape == embedder(prompts[0]).shape and len(embedder.memo) == 5
