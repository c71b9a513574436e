"""Scheduling policies on a synthetic clock with a synthetic (and, where it matters, exact) predictor.

Steps take exactly the predicted latency, so "the predictor is right" holds by construction and
every deadline miss would be the policy's fault.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import pytest

from patchedserve.errors import InvalidRequestError
from patchedserve.models.validation import GenerationParams
from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler import (
    FCFSScheduler,
    LatencyPredictor,
    Overhead,
    QueueScheduler,
    SchedulerConfig,
    StepOutcome,
    entry_of,
    make_scheduler,
    standalone_s,
)

PATCH = 256
COEF = (0.010, 0.004, 0.0005, 0.001, 0.0005, 0.0005, 0.002, 0.001)
"""Synthetic seconds per feature: 10 ms per step, 4 ms per patch, attention 0.5 ms per patch²..."""


def predictor() -> LatencyPredictor:
    return LatencyPredictor(coef=COEF, patch_size=PATCH)


def request(
    i: int,
    size: int = 512,
    steps: int = 10,
    cfg: bool = False,
    arrival_s: float = 0.0,
    slo_ms: float | None = None,
) -> Request:
    params = GenerationParams(
        width=size, height=size, steps=steps, guidance_scale=5.0 if cfg else 1.0, sampler="euler", seed=i
    )
    return Request(
        request_id=i,
        prompt="",
        negative_prompt="",
        params=params,
        arrival_s=arrival_s,
        num_patches=(size // PATCH) ** 2,
        slo_ms=slo_ms,
    )


def scheduler(policy: str = "slo", **knobs: object) -> QueueScheduler:
    return make_scheduler(policy, predictor(), SchedulerConfig(**knobs))  # type: ignore[arg-type]


@dataclass
class Trace:
    """What a simulated run did."""

    finished_s: dict[int, float] = field(default_factory=dict)
    admitted: list[int] = field(default_factory=list)
    dropped: list[Request] = field(default_factory=list)
    max_running: int = 0
    paused: int = 0
    """Request-steps sat out (``SchedulerOutput.paused``)."""


def simulate(s: QueueScheduler, requests: list[Request]) -> Trace:
    """Runs the engine loop on a virtual clock; each step takes exactly the predicted latency."""
    p = predictor()
    pending = sorted(requests, key=lambda r: r.arrival_s)
    trace, now = Trace(), 0.0
    while pending or s.num_waiting or s.num_running:
        while pending and pending[0].arrival_s <= now:
            s.add_request(pending.pop(0), now)
        out = s.schedule(now)
        trace.admitted += [r.request_id for r in out.admitted]
        trace.dropped += out.dropped
        trace.max_running = max(trace.max_running, len(out.running))
        trace.paused += len(out.paused)
        assert not out.paused or out.running, "a step never pauses every active request"
        if not out.running:
            if not pending:
                assert not s.num_waiting, "requests wait on an idle machine"
                break
            now = pending[0].arrival_s
            continue
        latency = p.predict_step([entry_of(r) for r in out.running])
        for r in out.running:
            r.step_index += 1
        now += latency
        for r in s.update_from_output(StepOutcome(out.running, latency, now)):
            r.status = RequestStatus.FINISHED
            trace.finished_s[r.request_id] = now
    return trace


def workload(seed: int, n: int = 60, rate_per_s: float = 4.0) -> list[Request]:
    rng = random.Random(seed)
    now, out = 0.0, []
    for i in range(n):
        now += rng.expovariate(rate_per_s)
        slo = rng.choice([None, None, rng.uniform(300, 3000)])
        out.append(request(i, rng.choice([256, 512, 768]), rng.randint(4, 20), rng.random() < 0.5, now, slo))
    return out


def test_infeasible_request_is_dropped_with_a_reason() -> None:
    s = scheduler()
    solo_s = standalone_s(request(0), predictor())
    late = request(1, slo_ms=1000 * solo_s / 2)
    s.add_request(late, 0.0)
    out = s.schedule(0.0)
    assert out.dropped == [late] and not out.admitted
    assert late.status == RequestStatus.DROPPED
    assert late.error is not None and "deadline" in late.error
    assert s.num_waiting == 0


@pytest.mark.parametrize("pause", [True, False])
@pytest.mark.parametrize("admission", ["throughput", "least-slack"])
@pytest.mark.parametrize("seed", range(4))
def test_admitted_requests_meet_their_deadlines_when_the_predictor_is_right(
    seed: int, admission: str, pause: bool
) -> None:
    requests = workload(seed)
    trace = simulate(scheduler(admission=admission, pause=pause), requests)
    assert trace.dropped, "the workload should overload the machine"
    by_id = {r.request_id: r for r in requests}
    assert set(trace.admitted) == set(trace.finished_s)
    assert len(trace.finished_s) >= 10, "with few finished requests the deadline check says little"
    for rid, done_s in trace.finished_s.items():
        deadline = by_id[rid].deadline_s
        assert deadline is not None and done_s <= deadline + 1e-9


def test_the_deadline_workloads_make_requests_sit_out_steps() -> None:
    # So the test above holds the pauses to the deadline guarantee too.
    paused = [simulate(scheduler(), workload(seed)).paused for seed in range(4)]
    assert sum(paused) > 0, paused


@pytest.mark.parametrize("pause", [True, False])
def test_a_lenient_request_sits_out_steps_so_an_urgent_one_makes_it(pause: bool) -> None:
    # Alone, the small request takes 0.19 s; beside the large one each of its steps takes 0.1 s
    # instead of 0.019, 1 s in all against its 0.4 s objective. The large one has seconds to spare.
    large = request(0, size=768, steps=20, slo_ms=9000)
    small = request(1, size=256, steps=10, arrival_s=0.5, slo_ms=400)
    trace = simulate(scheduler(pause=pause), [large, small])
    assert trace.finished_s[0] <= large.deadline_s  # type: ignore[operator]
    if pause:
        assert trace.finished_s[1] <= small.deadline_s  # type: ignore[operator]
        # The large one sat out only during the small one's steps, and only as many as it needed.
        assert 0 < trace.paused < 10
    else:
        assert trace.dropped == [small] and trace.paused == 0


def test_a_request_without_time_to_spare_is_not_paused() -> None:
    # The large request's objective leaves it no room to wait for the small one's run.
    large = request(0, size=768, steps=20, slo_ms=2000)
    small = request(1, size=256, steps=10, arrival_s=0.5, slo_ms=400)
    trace = simulate(scheduler(), [large, small])
    assert trace.dropped == [small] and trace.paused == 0
    assert trace.finished_s[0] <= large.deadline_s  # type: ignore[operator]


def test_nobody_sits_out_while_every_request_is_on_course() -> None:
    s = scheduler()
    for i, size in enumerate((768, 512, 256)):
        s.add_request(request(i, size=size, steps=10, slo_ms=60_000), 0.0)
    for now_s in (0.0, 0.5, 1.0):
        out = s.schedule(now_s)
        assert len(out.running) == 3 and not out.paused


def test_least_slack_first_under_pressure() -> None:
    # The paper's rule, slack alone (relaxed_slack=inf); arrival order is the opposite of urgency.
    s = scheduler(max_running=1, admission="least-slack", relaxed_slack=math.inf)
    solo_s = standalone_s(request(0), predictor())
    for i, scale in enumerate([8.0, 4.0, 2.0]):
        s.add_request(request(i, slo_ms=1000 * solo_s * scale), 0.0)
    assert [r.request_id for r in s.schedule(0.0).admitted] == [2]
    trace = simulate(s, [])
    assert trace.admitted == [1, 0]


def test_throughput_preference_when_slack_is_relaxed() -> None:
    def pick(relaxed_slack: float) -> int:
        s = scheduler(max_running=2, admission="least-slack", relaxed_slack=relaxed_slack)
        s.add_request(request(0, size=512), 0.0)
        assert [r.request_id for r in s.schedule(0.0).admitted] == [0]
        s.add_request(request(1, size=768, slo_ms=60_000), 0.0)  # less slack (larger), arrived first
        s.add_request(request(2, size=512, slo_ms=80_000), 0.0)  # shares the step with request 0
        return s.schedule(0.0).admitted[0].request_id

    assert pick(relaxed_slack=1.0) == 2  # relaxed: most work per second of added step time
    assert pick(relaxed_slack=math.inf) == 1  # never relaxed: least slack


def test_throughput_admission_prefers_work_per_second_even_under_pressure() -> None:
    s = scheduler(max_running=2)
    s.add_request(request(0, size=512), 0.0)
    assert [r.request_id for r in s.schedule(0.0).admitted] == [0]
    p = predictor()
    urgent = request(1, size=768)  # little slack, adds a new resolution and 9 patches per step
    urgent.slo_ms = 1000 * standalone_s(urgent, p) * 1.9
    s.add_request(urgent, 0.0)
    s.add_request(request(2, size=512, slo_ms=600_000), 0.0)  # shares the step with request 0
    assert [r.request_id for r in s.schedule(0.0).admitted] == [2]


def wait_for_drain(admission: str) -> tuple[Request, Trace]:
    """A request that misses its deadline if it joins the running batch now, but not once the
    batch has finished."""
    p = predictor()
    running = request(0, size=768, steps=4, slo_ms=600_000)
    joiner = request(1, size=256, steps=10, arrival_s=0.001)
    alone_s = standalone_s(joiner, p)
    now_s = p.predict_step([entry_of(running), entry_of(joiner)])
    assert 10 * now_s > 1.5 * alone_s  # joining the big batch for all its steps would miss
    joiner.slo_ms = 1000 * 1.5 * alone_s + 4000 * p.predict_step([entry_of(running)])
    trace = simulate(scheduler(admission=admission), [running, joiner])
    return joiner, trace


def test_throughput_admission_lets_a_request_wait_for_the_batch_to_drain() -> None:
    joiner, trace = wait_for_drain("throughput")
    assert not trace.dropped and trace.admitted == [0, 1]
    assert joiner.deadline_s is not None and trace.finished_s[1] <= joiner.deadline_s


def test_least_slack_admission_refuses_a_request_that_would_miss_in_the_current_batch() -> None:
    joiner, trace = wait_for_drain("least-slack")
    assert trace.dropped == [joiner] and trace.admitted == [0]
    assert joiner.error is not None and "in a batch with 1 running" in joiner.error


def test_admission_keeps_active_requests_on_time() -> None:
    p = predictor()
    s = scheduler(max_running=12)
    tight = request(0, size=768, steps=20)
    tight.slo_ms = 1000 * standalone_s(tight, p) * 1.05  # only just makes it alone
    s.add_request(tight, 0.0)
    assert s.schedule(0.0).admitted == [tight]
    s.add_request(request(1, size=768, steps=20, slo_ms=600_000), 0.0)
    assert not s.schedule(0.0).admitted  # would push the active request past its deadline
    tight.step_index = tight.params.steps - 1  # nearly done: room now
    assert [r.request_id for r in s.schedule(0.0).admitted] == [1]


def test_active_set_cap_is_respected() -> None:
    for policy in ("fcfs", "slo"):
        requests = [request(i, size=256, steps=5, slo_ms=600_000) for i in range(30)]
        trace = simulate(scheduler(policy, max_running=3), requests)
        assert trace.max_running == 3 and len(trace.finished_s) == 30


def test_best_effort_keeps_infeasible_requests_and_serves_them_last() -> None:
    s = scheduler(on_infeasible="best-effort", max_running=1)
    solo_s = standalone_s(request(0), predictor())
    hopeless = request(0, slo_ms=1000 * solo_s / 4)
    fine = request(1, slo_ms=1000 * solo_s * 10)
    trace = simulate(s, [hopeless, fine])
    assert not trace.dropped
    assert trace.admitted == [1, 0]
    assert hopeless.status == RequestStatus.FINISHED


def test_fcfs_admits_in_arrival_order_and_sets_deadlines() -> None:
    s = scheduler("fcfs", max_running=2)
    requests = [request(i, size=768 if i % 2 else 256, arrival_s=0.1 * i) for i in range(5)]
    requests[3].slo_ms = 2500
    trace = simulate(s, requests)
    assert trace.admitted == [0, 1, 2, 3, 4]
    assert requests[3].deadline_s == pytest.approx(0.3 + 2.5)
    assert requests[0].deadline_s == pytest.approx(5.0 * standalone_s(requests[0], predictor()))


def test_fcfs_still_builds_from_a_cap_alone() -> None:
    s = FCFSScheduler(2)
    for i in range(3):
        s.add_request(request(i), 0.0)
    assert [r.request_id for r in s.schedule(0.0).admitted] == [0, 1]
    assert s.waiting[0].deadline_s is None  # no predictor, no slo_ms


def test_make_scheduler_rejects_unknown_policies_and_slo_without_predictor() -> None:
    with pytest.raises(InvalidRequestError, match="fcfs, slo") as err:
        make_scheduler("edf", predictor())
    assert err.value.field == "policy"
    with pytest.raises(InvalidRequestError, match="predictor"):
        make_scheduler("slo", None)
    with pytest.raises(InvalidRequestError) as bad:
        SchedulerConfig(on_infeasible="retry")
    assert bad.value.field == "on_infeasible"
    with pytest.raises(InvalidRequestError, match="throughput, least-slack") as bad:
        SchedulerConfig(admission="edf")
    assert bad.value.field == "admission"


def tight_small(i: int, budget_s: float = 0.06, steps: int = 10) -> Request:
    """A 256-px request whose deadline allows ``budget_s`` per step if it joins on arrival."""
    return request(i, size=256, steps=steps, slo_ms=1000 * budget_s * steps)


def reserve_scenario(reserve: bool) -> tuple[QueueScheduler, Request]:
    """One lenient 512-px request runs; a tight small one was seen; a second 512-px one waits."""
    s = scheduler(reserve=reserve)
    s.add_request(request(0, size=512, slo_ms=600_000), 0.0)
    assert [r.request_id for r in s.schedule(0.0).admitted] == [0]
    s.add_request(tight_small(1), 0.0)
    s.finish_requests([1], RequestStatus.CANCELLED)  # gone, but its class was seen
    joiner = request(2, size=512, slo_ms=600_000)
    s.add_request(joiner, 0.0)
    return s, joiner


def test_reserve_holds_back_a_lenient_request_that_would_shut_out_the_tightest_class() -> None:
    p = predictor()
    big, small = (512, 512, False), (256, 256, False)
    # Both 512-px requests fit their own deadlines, but with them a small request could not join.
    assert p.predict_step([big, big, small]) > 0.06 >= p.predict_step([big, small])
    s, waiting = reserve_scenario(reserve=True)
    assert not s.schedule(0.0).admitted and s.waiting == [waiting]
    s.add_request(tight_small(3), 0.0)  # the tightest class itself is exempt
    assert [r.request_id for r in s.schedule(0.0).admitted] == [3]
    s_off, joiner_off = reserve_scenario(reserve=False)
    assert s_off.schedule(0.0).admitted == [joiner_off]


def test_reserve_exempts_the_whole_tightest_class_despite_rounding() -> None:
    p = predictor()
    big, small = (512, 512, False), (256, 256, False)
    assert p.predict_step([big, small]) <= 0.05 < p.predict_step([big, small, small])
    s = scheduler(reserve=True)
    s.add_request(request(0, size=512, slo_ms=600_000), 0.0)
    s.schedule(0.0)
    seen = request(1, size=256, steps=10, slo_ms=500.0, arrival_s=0.0)
    s.add_request(seen, 0.0)
    s.finish_requests([1], RequestStatus.CANCELLED)
    same = request(2, size=256, steps=10, slo_ms=500.0, arrival_s=0.6)
    s.add_request(same, 0.6)
    assert same.deadline_s is not None and same.deadline_s - same.arrival_s > 0.5  # rounding
    assert s.schedule(0.6).admitted == [same]  # same class as the reserve's: exempt


def lenient_small_joins(gap_s: float) -> bool:
    """Six tight small requests arrived ``gap_s`` apart; one lenient 512-px request runs. Does a
    lenient small one join? With it, the step leaves room for one more tight request, not two."""
    p = predictor()
    big, small = (512, 512, False), (256, 256, False)
    assert p.predict_step([big, small, small]) <= 0.055 < p.predict_step([big, small, small, small])
    s = scheduler(reserve=True)
    for i in range(1, 7):
        tight = request(i, size=256, steps=10, slo_ms=550.0, arrival_s=i * gap_s)
        s.add_request(tight, tight.arrival_s)
        s.finish_requests([i], RequestStatus.CANCELLED)
    now_s = 6 * gap_s
    s.add_request(request(10, size=512, slo_ms=600_000, arrival_s=now_s), now_s)
    assert [r.request_id for r in s.schedule(now_s).admitted] == [10]
    s.add_request(request(11, size=256, slo_ms=600_000, arrival_s=now_s), now_s)
    return [r.request_id for r in s.schedule(now_s).admitted] == [11]


def test_reserve_holds_room_for_as_many_tight_requests_as_are_expected() -> None:
    # Little's law: about 10 tight arrivals per second x 0.55 s objective -> room for several.
    assert not lenient_small_joins(gap_s=0.1)
    # One tight arrival every 10 s: room for one is enough.
    assert lenient_small_joins(gap_s=10.0)


def test_reserve_never_idles_the_machine() -> None:
    p = predictor()
    s = scheduler(reserve=True)
    s.add_request(tight_small(0), 0.0)
    s.finish_requests([0], RequestStatus.CANCELLED)
    big = request(1, size=768, slo_ms=600_000)
    assert p.predict_step([entry_of(big), (256, 256, False)]) > 0.06  # no room even alone
    s.add_request(big, 0.0)
    assert s.schedule(0.0).admitted == [big]
    s.add_request(request(2, size=512, slo_ms=600_000), 0.0)
    assert not s.schedule(0.0).admitted  # but nothing lenient joins it


def test_reserve_ignores_a_class_that_cannot_run_two_at_a_time() -> None:
    p = predictor()
    small = (256, 256, False)
    budget_s = 0.5 * (p.predict_step([small]) + p.predict_step([small, small]))
    s = scheduler(reserve=True)
    s.add_request(request(0, size=512, slo_ms=600_000), 0.0)
    s.schedule(0.0)
    s.add_request(tight_small(1, budget_s=budget_s), 0.0)
    s.finish_requests([1], RequestStatus.CANCELLED)
    s.add_request(request(2, size=512, slo_ms=600_000), 0.0)
    assert [r.request_id for r in s.schedule(0.0).admitted] == [2]


def test_reserve_window_must_be_positive() -> None:
    with pytest.raises(InvalidRequestError, match="reserve_window") as bad:
        SchedulerConfig(reserve_window=0)
    assert bad.value.field == "reserve_window"


def test_slo_policy_decodes_the_earliest_deadline_that_can_still_be_met_first() -> None:
    p = LatencyPredictor(coef=COEF, patch_size=PATCH, overhead=Overhead(decode_base_s=0.05))
    s = make_scheduler("slo", p, SchedulerConfig())
    decode_s = p.decode_s(512, 512)
    soon, later = request(1, slo_ms=1000.0), request(2, slo_ms=3000.0)
    for r in (later, soon):
        s.add_request(r, 0.0)
    assert s.decode_priority(soon, 0.5) == pytest.approx(1.0)  # its deadline
    assert s.decode_priority(later, 0.5) == pytest.approx(3.0)
    assert s.decode_priority(soon, 1.0 - decode_s / 2) == math.inf  # late even if decoded at once: last


def test_slo_policy_decodes_in_the_loop_only_a_deadline_that_needs_full_speed() -> None:
    p = LatencyPredictor(coef=COEF, patch_size=PATCH, overhead=Overhead(decode_base_s=0.05))
    s = make_scheduler("slo", p, SchedulerConfig(inline_decode=2.0))
    decode_s = p.decode_s(512, 512)
    r = request(1, slo_ms=1000.0)  # deadline at 1.0 s
    s.add_request(r, 0.0)
    assert not s.decode_inline(r, 1.0 - 3 * decode_s)  # room for a slow decode: the worker
    assert s.decode_inline(r, 1.0 - 1.5 * decode_s)  # only a decode at full speed makes it
    assert not s.decode_inline(r, 1.0 - 0.5 * decode_s)  # late either way: not worth a pause
    off = make_scheduler("slo", p, SchedulerConfig(inline_decode=0.0))
    off.add_request(r, 0.0)
    assert not off.decode_inline(r, 1.0 - 1.5 * decode_s)
    fcfs = scheduler("fcfs")
    fcfs.add_request(r, 0.0)
    assert not fcfs.decode_inline(r, 1.0 - 1.5 * decode_s)


def test_slo_policy_decodes_in_the_loop_a_request_the_worker_would_make_late() -> None:
    p = LatencyPredictor(coef=COEF, patch_size=PATCH, overhead=Overhead(decode_base_s=0.05))
    s = make_scheduler("slo", p, SchedulerConfig(inline_decode=2.0))
    decode_s = p.decode_s(512, 512)
    r, other = request(1, slo_ms=1000.0), request(2, slo_ms=5000.0)
    for x in (r, other):
        s.add_request(x, 0.0)
    now_s = 1.0 - 3 * decode_s  # room for its own slow decode on an idle worker
    assert not s.decode_inline(r, now_s)
    # Queued behind another decode of its size, the worker needs 2 x 2 of its decodes: too late.
    assert s.decode_inline(r, now_s, [(other, 0.0)])
    # That decode has already run 1.5 of its decodes' time on the worker: 2.5 left, it fits.
    assert not s.decode_inline(r, now_s, [(other, 1.5 * decode_s)])
    # Late even at full speed: no pause for it, however long the queue.
    assert not s.decode_inline(r, 1.0 - 0.5 * decode_s, [(other, 0.0)])


def test_inline_decode_must_not_be_negative() -> None:
    with pytest.raises(InvalidRequestError, match="inline_decode"):
        SchedulerConfig(inline_decode=-1.0)


def test_fcfs_decodes_in_finishing_order() -> None:
    s = scheduler("fcfs")
    soon, later = request(1, slo_ms=1000.0), request(2, slo_ms=3000.0)
    for r in (later, soon):
        s.add_request(r, 0.0)
    assert s.decode_priority(later, 0.5) == s.decode_priority(soon, 0.5)  # ties: the worker's order
