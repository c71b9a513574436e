"""Pausing lenient requests for urgent ones: the ``slo`` policy's ``SchedulerConfig.pause``.

Every active request runs in every step, so a step lasts as long as the whole active set needs.
A small image has a short objective (a multiple of its short standalone time) and a large one a
long objective, so a large request in the batch can make every step too long for a small one's
deadline while it has time to spare itself. Pausing lets the two share the machine by urgency:

* **Which requests step** (``step_set``). A request's *budget* is the longest step that still
  lets it make its deadline: (deadline - now - its fixed costs left) / steps left. An active
  request whose budget is below the predicted step of the whole active set A, but not below its
  own step alone (it can still be saved), is *at risk*. Then the others sit the step out, most
  budget first, each only while it can afford to: after losing this step it must still make its
  deadline with L(A) for all of its remaining steps (A includes the at-risk requests). They stop
  once the step fits the tightest budget at risk. If no set of pauses gets there, every request
  steps (pausing would cost the others without saving anyone). Requests admitted in this call
  always step.
* **Who may join** (``admit_by_pausing``). A waiting request c that would miss its deadline if
  it joined the whole batch (budget < L(A + c)) joins when pausing the active requests that
  can afford to wait for all of c's run makes it fit: L(K + c) <= c's budget, K the requests
  kept, every on-course request of K stays on course with L(K + c), and each paused one still
  makes its deadline with L(A + c) after waiting for c's run. Of those, the most urgent (least
  budget) joins first; then ``step_set`` does the actual pausing, step by step, only as far as
  it is needed. While a request is at risk, nothing joins (by this rule or the usual one): the
  pauses that hold it on course are planned without the newcomer.

Everything is priced with the predictor's current correction; budgets and the step model are
the ones admission uses (``scheduler.slo``). Paused requests keep their place in the active set
and their latents in the engine (``SchedulerOutput.paused``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from patchedserve.request import Request
from patchedserve.scheduler.deadline import entry_of
from patchedserve.scheduler.predictor import LatencyPredictor

Budget = Callable[[Request], float]
"""A request -> the longest step that still lets it make its deadline (inf: no deadline to keep)."""


def set_step_s(predictor: LatencyPredictor, requests: Sequence[Request]) -> float:
    """Predicted latency of one step of ``requests`` (with the online correction; 0 for none)."""
    return predictor.predict_step([entry_of(r) for r in requests])


def _affords(r: Request, budget_s: float, lost_s: float, full_step_s: float) -> bool:
    """Whether ``r`` still makes its deadline after waiting ``lost_s`` and then stepping at
    ``full_step_s`` for all of its remaining steps (its budget is per remaining step)."""
    return math.isinf(budget_s) or budget_s * r.steps_left - lost_s >= r.steps_left * full_step_s


def at_risk(predictor: LatencyPredictor, active: Sequence[Request], budget: Budget) -> list[Request]:
    """Active requests that would miss their deadlines stepping with the whole active set but
    could still make them: budget below the set's step, not below their own step alone."""
    budgets = {r.request_id: budget(r) for r in active}
    return _at_risk(predictor, active, budgets, set_step_s(predictor, active))


def _at_risk(
    predictor: LatencyPredictor, active: Sequence[Request], budgets: dict[int, float], full_s: float
) -> list[Request]:
    return [r for r in active if predictor.solo_step_s(entry_of(r)) <= budgets[r.request_id] < full_s]


def step_set(
    predictor: LatencyPredictor, active: Sequence[Request], budget: Budget, fixed: set[int]
) -> list[Request]:
    """The requests of ``active`` that take the next step (see the module docstring).

    Args:
        predictor: the policy's latency predictor.
        active: the active set, in its stable order.
        budget: each request's budget.
        fixed: ids that must step (requests admitted in this call).
    Returns:
        ``active`` without the paused requests, in the same order; never empty when ``active``
        is not.
    """
    if len(active) < 2:
        return list(active)
    full_s = set_step_s(predictor, active)
    budgets = {r.request_id: budget(r) for r in active}
    risky = _at_risk(predictor, active, budgets, full_s)
    if not risky:
        return list(active)
    target_s = min(budgets[r.request_id] for r in risky)
    must_step = {r.request_id for r in risky} | fixed
    stepping, step_s = list(active), full_s
    lenient = sorted(
        (r for r in active if r.request_id not in must_step), key=lambda r: -budgets[r.request_id]
    )
    for v in lenient:
        if step_s <= target_s:
            break
        rest = [r for r in stepping if r is not v]
        rest_s = set_step_s(predictor, rest)
        if _affords(v, budgets[v.request_id], rest_s, full_s):
            stepping, step_s = rest, rest_s
    return stepping if step_s <= target_s else list(active)


def admit_by_pausing(
    predictor: LatencyPredictor,
    active: Sequence[Request],
    late: Sequence[Request],
    budget: Budget,
    fixed_s: Callable[[Request], float],
) -> Request | None:
    """The waiting request that may join by pausing others, or None (see the module docstring).

    Args:
        predictor: the policy's latency predictor.
        active: the active set (not empty), none of it at risk (``at_risk``).
        late: waiting requests that would miss their deadlines if they joined all of ``active``
            (with deadlines, not best-effort).
        budget: each request's budget.
        fixed_s: a waiting request's fixed costs left (encode and decode, corrected).
    """
    budgets = {r.request_id: budget(r) for r in active}
    current_s = set_step_s(predictor, active)
    on_course = [r for r in active if budgets[r.request_id] >= current_s]
    by_budget = sorted(active, key=lambda r: -budgets[r.request_id])
    fastest: dict[tuple[object, int], tuple[float, set[int]]] = {}
    for c in sorted(late, key=budget):
        c_budget = budget(c)
        if c_budget < predictor.solo_step_s(entry_of(c)):
            continue  # cannot be saved even alone
        key = (entry_of(c), c.steps_left)
        if key not in fastest:  # the most pausing possible for a request like c: its fastest step
            full_s = set_step_s(predictor, [*active, c])  # what a paused request steps at later
            kept = list(active)
            for v in by_budget:
                trial = [r for r in kept if r is not v]
                run_s = c.steps_left * set_step_s(predictor, [*trial, c]) + fixed_s(c)
                if _affords(v, budgets[v.request_id], run_s, full_s):
                    kept = trial
            fastest[key] = (set_step_s(predictor, [*kept, c]), {r.request_id for r in kept})
        step_s, kept_ids = fastest[key]
        if step_s <= c_budget and all(
            budgets[r.request_id] >= step_s for r in on_course if r.request_id in kept_ids
        ):
            return c
    return None
