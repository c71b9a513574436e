"""SLO-aware admission after the paper: least slack first, drop the infeasible, admission control.

Each ``schedule`` call, with A the active set and L(X) the predicted step latency of set X:

1. Infeasible requests go first: a waiting request that would miss its deadline even if it ran
   alone from now on (encode + steps x solo step + decode) is dropped (``on_infeasible="drop"``,
   its ``error`` says by how much) or kept as best-effort, served after every other request.
   Alone is the optimistic bound, so nothing is dropped that could still make it.
2. Every waiting request c gets a slack with A + c:
   ``(deadline - now - (encode + steps_left x L(A + c) + decode)) / standalone``, where standalone
   is its whole latency alone from the profile. Lower is more urgent; best-effort ones sort last.
3. c *fits* when it makes its own deadline in A + c (slack >= 0) and every active request that
   is on course now still makes its own with L(A + c) for all of its remaining steps. Active
   requests already off course are not protected: they are late anyway, and protecting them
   would stop all admission. The check is pessimistic: A only shrinks as requests finish.
4. If the most urgent slack is relaxed (> ``relaxed_slack``), throughput decides: admit the
   fitting candidate with the most work per second of added step time,
   ``solo_step(c) / (L(A + c) - L(A))``, ties to the least slack. Work is what the request would
   cost alone, so this favours requests that share the step's fixed costs (small images, a
   resolution already in the batch) and finishes the most requests per second of machine time.
   Otherwise admit the most urgent if it fits, else stop: no backfill, since a less urgent
   request admitted now would slow the batch the urgent one is waiting to join.
5. Repeat until the cap (``max_running``) or no admission.

No preemption: a request runs to the end once admitted. ``SchedulerOutput.preempted`` is where a
preempting variant would report requests it moves back to the queue.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from patchedserve.request import Request, RequestStatus
from patchedserve.scheduler.base import QueueScheduler
from patchedserve.scheduler.config import SchedulerConfig
from patchedserve.scheduler.deadline import entry_of, standalone_s
from patchedserve.scheduler.features import MixSums
from patchedserve.scheduler.interface import SchedulerOutput, StepOutcome
from patchedserve.scheduler.predictor import LatencyPredictor


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
        self._standalone: dict[int, float] = {}

    # ------------------------------------------------------------------ bookkeeping
    def add_request(self, request: Request, now_s: float) -> None:
        super().add_request(request, now_s)
        self._standalone[request.request_id] = standalone_s(request, self.model)

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
            self._standalone.pop(r.request_id, None)

    # ------------------------------------------------------------------ admission
    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        self._drop_infeasible(now_s, out)
        active = self.model.mix([entry_of(r) for r in self.running])
        while self.waiting and len(self.running) < self.max_running:
            chosen = self._choose(now_s, active)
            if chosen is None:
                break
            self.waiting.remove(chosen)
            self.running.append(chosen)
            out.admitted.append(chosen)
            active.add(entry_of(chosen))

    def _drop_infeasible(self, now_s: float, out: SchedulerOutput) -> None:
        """Step 1: drop (or mark best-effort) what cannot finish in time even alone."""
        p, keep = self.model, []
        encode_s = p.encode_s()
        for r in self.waiting:
            e = entry_of(r)
            if r.request_id in self.best_effort or r.deadline_s is None:
                keep.append(r)
                continue
            need_s = encode_s + r.steps_left * p.solo_step_s(e) + p.decode_s(e[0], e[1])
            left_s = r.deadline_s - now_s
            if need_s <= left_s:
                keep.append(r)
            elif self.config.on_infeasible == "best-effort":
                self.best_effort.add(r.request_id)
                keep.append(r)
            else:
                r.error = (
                    f"dropped: cannot meet its deadline (needs {need_s:.3f} s even alone, "
                    f"{max(left_s, 0.0):.3f} s left of its {r.deadline_s - r.arrival_s:.3f} s objective)"
                )
                out.dropped.append(r)
                self._forget([r])
        self.waiting = keep

    def _step_budget(self, now_s: float, step_now_s: float) -> float:
        """Largest step latency that keeps every on-course active request on course (inf if none)."""
        p, budget = self.model, math.inf
        for a in self.running:
            if a.deadline_s is None or a.steps_left <= 0 or a.request_id in self.best_effort:
                continue
            w, h, _ = entry_of(a)
            fixed_s = p.decode_s(w, h) + (p.encode_s() if a.step_index == 0 else 0.0)
            per_step_s = (a.deadline_s - now_s - fixed_s) / a.steps_left
            if per_step_s >= step_now_s:
                budget = min(budget, per_step_s)
        return budget

    def _choose(self, now_s: float, active: MixSums) -> Request | None:
        """Steps 2-4: the request to admit next, or None to stop admitting in this call."""
        p = self.model
        step_now_s = p.step_s(active)
        budget_s = self._step_budget(now_s, step_now_s)
        step_with = p.step_with_fn(active)
        encode_s = p.encode_s()
        urgent: Request | None = None
        urgent_key, urgent_fits = (True, math.inf), False
        best: Request | None = None
        best_key = (-math.inf, -math.inf)
        for r in self.waiting:
            e = entry_of(r)
            step_s = step_with(e)
            best_effort = r.request_id in self.best_effort
            remaining_s = encode_s + r.steps_left * step_s + p.decode_s(e[0], e[1])
            deadline_s = math.inf if r.deadline_s is None else r.deadline_s
            slack = (deadline_s - now_s - remaining_s) / self._standalone_of(r)
            fits = step_s <= budget_s and (best_effort or slack >= 0.0)
            if (best_effort, slack) < urgent_key:
                urgent, urgent_key, urgent_fits = r, (best_effort, slack), fits
            if fits and not best_effort:
                gain = p.solo_step_s(e) / max(step_s - step_now_s, 1e-12)
                if (gain, -slack) > best_key:
                    best, best_key = r, (gain, -slack)
        if urgent is None:
            return None
        if not urgent_key[0] and urgent_key[1] > self.config.relaxed_slack:
            return best
        return urgent if urgent_fits else None

    def _standalone_of(self, r: Request) -> float:
        value = self._standalone.get(r.request_id)
        if value is None:
            value = self._standalone[r.request_id] = standalone_s(r, self.model)
        return max(value, 1e-9)
