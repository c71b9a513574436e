"""SLO-aware admission after the paper: refuse the infeasible, keep every admitted request on time.

Each ``schedule`` call, with A the active set and L(X) the predicted step latency of set X:

1. A waiting request that would miss its deadline even if it ran alone from now on (encode +
   steps x solo step + decode) is refused: dropped (``on_infeasible="drop"``, its ``error`` says
   by how much) or kept best-effort, served after every other request. Checked at every call, so
   a full active set does not keep a hopeless request waiting.
2. While a slot is free, every waiting request c gets a slack with A + c:
   ``(deadline - now - (encode + steps_left x L(A + c) + decode)) / standalone``, where standalone
   is its whole latency alone from the profile. L(A + c) for all of its steps is pessimistic, as A
   shrinks when requests finish; it is the paper's rule and it keeps every admission safe.
3. A request with negative slack cannot finish in time if it joins now. With
   ``admission="throughput"`` (the default) it waits: the batch may drain enough for it before
   step 1 refuses it, and until then it costs nothing. With ``admission="least-slack"`` (the
   paper's rule) it is refused now, as in 1.
4. c *fits* when every active request that is on course now still makes its own deadline with
   L(A + c) for all of its remaining steps. Active requests already off course are not
   protected: they are late anyway, and protecting them would stop all admission.
5. Which fitting candidate joins first:

   * ``throughput``: the one with the most work per second of added step time,
     ``solo_step(c) / (L(A + c) - L(A))``, ties to the least slack. Work is what the request would
     cost alone, so this favours requests that share the step's fixed costs (small images, a
     resolution already in the batch): when not every request can be served, it finishes the
     most requests per second of machine time. Under overload large images wait longest and are
     refused first; the per-resolution results show it.
   * ``least-slack``: if the most urgent slack is relaxed (> ``relaxed_slack``), as
     ``throughput``; otherwise the most urgent if it fits, else none (no backfill, since a less
     urgent request admitted now would slow the batch the urgent one is waiting to join).

   With ``reserve`` on (the default), a candidate also needs room for the tightest class seen
   among the last ``reserve_window`` arrivals: the class with the least
   ``RequestCosts.step_budget_s`` (longest step that lets a request make its deadline if it joins
   on arrival), among classes that could run two at a time within it. With A + c + k requests of
   that class the step must stay within that budget, so they could join on arrival. k is how
   many of them are expected while one may still wait or run (Little's law: the class's arrival
   rate over the window x its objective, rounded up, at least 1). Candidates of that class are
   exempt, and so is the first request of an empty batch (holding it back would only idle the
   machine). Lenient requests (large images with their longer objectives) would otherwise fill
   the step up to their own budgets and shut out the tighter requests that arrive while they run.

   With ``pause`` on (the default), when no candidate fits, one that would be late in the whole
   batch may still join if pausing active requests with time to spare makes it fit
   (``scheduler.pausing``).

6. Repeat from 2 until the cap (``max_running``) or no admission.

7. With ``pause``, an active request about to miss its deadline in the next step makes requests
   with time to spare sit that step out (``scheduler.pausing``, ``SchedulerOutput.paused``).

Finished requests queue for the decode worker earliest deadline first (``decode_priority``);
one that would miss its deadline even if decoded at once goes after those that can still make
theirs. One that can still make it, but with less than ``inline_decode`` of its predicted decode
times left, counting the decodes it would wait for on the worker, is decoded at once in the
denoising loop instead (``decode_inline``): the steps wait for it, so it runs at full speed
rather than sharing the CPU with them and queueing behind other decodes.

No preemption: a request stays in the active set until its last step once admitted (a pause
only skips steps). ``SchedulerOutput.preempted`` is where a preempting variant would report
requests it moves back to the queue.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler.admission import QueueView, RequestCosts, request_costs
from patchedserve.scheduler.base import QueueScheduler
from patchedserve.scheduler.config import SchedulerConfig
from patchedserve.scheduler.deadline import entry_of
from patchedserve.scheduler.features import Entry, MixSums
from patchedserve.scheduler.interface import SchedulerOutput, StepOutcome
from patchedserve.scheduler.pausing import admit_by_pausing, at_risk, step_set
from patchedserve.scheduler.predictor import LatencyPredictor


class _Arrival(NamedTuple):
    """What the reserve remembers of one arrival."""

    arrival_s: float
    step_budget_s: float
    objective_s: float
    entry: Entry


class SLOScheduler(QueueScheduler):
    """The ``slo`` policy; see the module docstring."""

    policy = "slo"

    def __init__(
        self,
        max_running: int | None = None,
        predictor: LatencyPredictor | None = None,
        config: SchedulerConfig | None = None,
    ) -> None:
        super().__init__(max_running, predictor, config)
        if predictor is None:
            raise ValueError("the slo policy needs a latency predictor")
        self.model: LatencyPredictor = predictor
        self.best_effort: set[int] = set()
        """Ids of requests kept although they cannot make their deadline (``on_infeasible="best-effort"``)."""
        self._costs: dict[int, RequestCosts] = {}
        self._resolution_ids: dict[tuple[int, int], int] = {}
        self._view: QueueView | None = None
        self._recent: deque[_Arrival] = deque(maxlen=self.config.reserve_window)
        """The latest arrivals that the reserve may hold room for (``reserve`` only)."""
        self._reserve: tuple[float, Entry, int] | None = None
        """(step budget, entry, how many) of the tightest class the reserve holds room for."""

    # ------------------------------------------------------------------ bookkeeping
    def add_request(self, request: Request, now_s: float) -> None:
        super().add_request(request, now_s)
        costs = self._costs_of(request)
        if self.config.reserve and math.isfinite(costs.step_budget_s):
            # A class that cannot share a step even with its own kind is served alone; holding
            # room for it would only stop all batching.
            pair_s = self.model.model_s(self.model.mix([costs.entry, costs.entry]).vector())
            if pair_s <= costs.step_budget_s:
                assert request.deadline_s is not None  # a finite step budget has a deadline
                objective_s = request.deadline_s - request.arrival_s
                arrival = _Arrival(request.arrival_s, costs.step_budget_s, objective_s, costs.entry)
                self._recent.append(arrival)
                self._reserve = self._tightest_class()

    def _tightest_class(self) -> tuple[float, Entry, int]:
        """The recent class with the least step budget, and room for how many of it: those
        expected to arrive while one of them may still wait or run (Little's law: its arrival
        rate over the window x its objective), at least one."""
        recent = self._recent
        tightest = min(recent, key=lambda a: a.step_budget_s)
        count = 1
        span_s = recent[-1].arrival_s - recent[0].arrival_s
        if len(recent) > 1 and span_s > 0.0:
            same = sum(a.entry == tightest.entry for a in recent)
            rate = (len(recent) - 1) / span_s * same / len(recent)  # arrivals of the class per second
            count = max(1, min(math.ceil(rate * tightest.objective_s), self.max_running))
        return tightest.step_budget_s, tightest.entry, count

    def update_from_output(self, outcome: StepOutcome) -> list[Request]:
        done = super().update_from_output(outcome)
        self._forget(done)
        return done

    def finish_requests(self, request_ids: Iterable[int], status: RequestStatus) -> list[Request]:
        removed = super().finish_requests(request_ids, status)
        self._forget(removed)
        return removed

    def _forget(self, requests: Iterable[Request]) -> None:
        for r in requests:
            self.best_effort.discard(r.request_id)
            self._costs.pop(r.request_id, None)

    def _costs_of(self, r: Request) -> RequestCosts:
        costs = self._costs.get(r.request_id)
        if costs is None:
            key = (r.params.width, r.params.height)
            resolution_id = self._resolution_ids.setdefault(key, len(self._resolution_ids))
            costs = self._costs[r.request_id] = request_costs(r, self.model, resolution_id)
        return costs

    def _queue_view(self) -> QueueView:
        """The arrays over ``waiting``, rebuilt only when the queue changed since the last call."""
        view = self._view
        if view is None or view.source is not self.waiting or len(view.requests) != len(self.waiting):
            view = QueueView(self.waiting, [self._costs_of(r) for r in self.waiting], self.best_effort)
            self._view = view
        return view

    def decode_priority(self, request: Request, now_s: float) -> float:
        if request.deadline_s is None:
            return math.inf
        need_s = self.model.decode_s(request.params.width, request.params.height)
        return request.deadline_s if now_s + need_s <= request.deadline_s else math.inf

    def decode_inline(
        self, request: Request, now_s: float, ahead: Sequence[tuple[Request, float]] = ()
    ) -> bool:
        if request.deadline_s is None or request.request_id in self.best_effort:
            return False
        need_s = self.model.decode_s(request.params.width, request.params.height)
        left_s = request.deadline_s - now_s
        # On the worker every decode runs inline_decode times as long as alone; the one there now
        # has done part of its work.
        queued_s = sum(self.model.decode_s(a.params.width, a.params.height) for a, _ in ahead)
        started_s = sum(run_s for _, run_s in ahead)
        worker_s = self.config.inline_decode * (queued_s + need_s) - started_s
        return need_s <= left_s < worker_s

    # ------------------------------------------------------------------ admission
    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        if not self.waiting:
            return
        view = self._queue_view()
        self._drop_infeasible(view, now_s, out)
        active = self.model.mix([entry_of(r) for r in self.running])
        while len(self.running) < self.max_running:
            if self.config.pause and at_risk(self.model, self.running, lambda r: self._budget(r, now_s)):
                break  # pauses hold someone on course; a newcomer would upset them
            index = self._choose(view, now_s, active, out)
            if index is None and self.config.pause and self.running:
                index = self._pausing_choice(view, now_s, active)
            if index is None:
                break
            chosen = view.requests[index]
            view.open[index] = False
            self.running.append(chosen)
            out.admitted.append(chosen)
            active.add(view.costs[index].entry)
        if out.admitted or out.dropped:
            self.waiting = view.still_waiting()
            self._view = None

    def _drop_infeasible(self, view: QueueView, now_s: float, out: SchedulerOutput) -> None:
        """Step 1: refuse what cannot finish in time even alone (checked at every call, even at cap)."""
        need_s = view.need_alone_s(self.model)  # [W]
        late = view.open & ~view.best_effort & (now_s + need_s > view.deadline_s)  # [W]
        for i in np.flatnonzero(late):
            self._refuse(view, int(i), now_s, float(need_s[i]), "even alone", out)

    def _refuse(
        self, view: QueueView, index: int, now_s: float, need_s: float, how: str, out: SchedulerOutput
    ) -> None:
        """Drops a request that cannot make its deadline, or keeps it best-effort."""
        r = view.requests[index]
        if self.config.on_infeasible == "best-effort":
            self.best_effort.add(r.request_id)
            view.best_effort[index] = True
            return
        assert r.deadline_s is not None  # an infinite deadline is never late
        left_s, objective_s = max(r.deadline_s - now_s, 0.0), r.deadline_s - r.arrival_s
        r.error = (
            f"dropped: cannot meet its deadline (needs {need_s:.3f} s {how}, "
            f"{left_s:.3f} s left of its {objective_s:.3f} s objective)"
        )
        view.open[index] = False
        out.dropped.append(r)
        self._forget([r])

    def _budget(self, r: Request, now_s: float) -> float:
        """Longest step that lets ``r`` make its deadline from now, over all of its remaining
        steps (inf without a deadline to keep)."""
        if r.deadline_s is None or r.steps_left <= 0 or r.request_id in self.best_effort:
            return math.inf
        p, costs = self.model, self._costs_of(r)
        fixed_s = (costs.decode_s + (p.overhead.encode_s if r.step_index == 0 else 0.0)) * p.correction
        return (r.deadline_s - now_s - fixed_s) / r.steps_left

    def _step_budget(self, now_s: float, step_now_s: float) -> float:
        """Largest step latency that keeps every on-course active request on course (inf if none)."""
        budgets = (self._budget(a, now_s) for a in self.running)
        return min((b for b in budgets if b >= step_now_s), default=math.inf)

    def _step_set(self, now_s: float, out: SchedulerOutput) -> list[Request]:
        if not self.config.pause:
            return out.running
        joined = {r.request_id for r in out.admitted}
        return step_set(self.model, out.running, lambda r: self._budget(r, now_s), joined)

    def _pausing_choice(self, view: QueueView, now_s: float, active: MixSums) -> int | None:
        """Step 5 with ``pause``: a request that would be late in the whole batch but makes it
        while others with time to spare pause for it (``scheduler.pausing``)."""
        _, slack = view.evaluate(self.model, active, now_s, self._resolution_ids)  # [W]
        late = view.open & ~view.best_effort & np.isfinite(view.deadline_s) & (slack < 0.0)  # [W]
        if not late.any():
            return None
        p = self.model
        chosen = admit_by_pausing(
            p,
            self.running,
            [view.requests[i] for i in np.flatnonzero(late)],
            lambda r: self._budget(r, now_s),
            lambda r: (self._costs_of(r).decode_s + p.overhead.encode_s) * p.correction,
        )
        return None if chosen is None else view.requests.index(chosen)

    def _leaves_room(self, view: QueueView, active: MixSums, now_s: float) -> np.ndarray:  # [W] bool
        """Step 5's reserve: whether the tightest recent class could still join with each candidate."""
        assert self._reserve is not None
        budget_s, entry, count = self._reserve  # its resolution has an id since it arrived
        for _ in range(count):
            active.add(entry)
        try:
            with_tightest_s, _ = view.evaluate(self.model, active, now_s, self._resolution_ids)  # [W]
        finally:
            for _ in range(count):
                active.remove(entry)
        # Budgets of one class differ by rounding (deadline - arrival), hence the tolerance.
        same_class = view.step_budget_s <= budget_s * (1.0 + 1e-9)  # [W]
        return same_class | (with_tightest_s <= budget_s)

    def _choose(self, view: QueueView, now_s: float, active: MixSums, out: SchedulerOutput) -> int | None:
        """Steps 2-5: the queue index to admit next, or None to stop admitting in this call."""
        step_now_s = self.model.step_s(active)
        step_s, slack = view.evaluate(self.model, active, now_s, self._resolution_ids)  # [W], [W]
        late = view.open & ~view.best_effort & (slack < 0.0)  # [W] would miss if it joined now
        if self.config.admission == "least-slack":
            # Taken in slack order one at a time this refuses exactly these, as their slacks do not
            # change meanwhile.
            for i in np.flatnonzero(late):
                fixed_s = (view.decode_s[i] + self.model.overhead.encode_s) * self.model.correction
                need_s = float(step_s[i] * view.steps_left[i] + fixed_s)
                self._refuse(view, int(i), now_s, need_s, f"in a batch with {active.requests} running", out)
        normal = view.open & ~view.best_effort  # [W]
        # Best-effort requests join only when no request that may still make its deadline waits.
        pool = normal & ~late if normal.any() else view.open  # [W]
        if not pool.any():
            return None
        fits = pool & (step_s <= self._step_budget(now_s, step_now_s))  # [W]
        if self._reserve is not None and active.requests:  # never idle the machine for it
            fits &= self._leaves_room(view, active, now_s)
        urgent = int(np.argmin(np.where(pool, slack, np.inf)))
        if self.config.admission == "least-slack" and slack[urgent] <= self.config.relaxed_slack:
            return urgent if fits[urgent] else None
        if not fits.any():
            return None
        work_per_s = view.solo_step_s * self.model.correction / np.maximum(step_s - step_now_s, 1e-12)
        gain = np.where(fits, work_per_s, -np.inf)
        best = fits & (gain >= gain.max())  # ties (same size and CFG) go to the least slack
        return int(np.argmin(np.where(best, slack, np.inf)))
