"""Predictions for the whole waiting queue at once: the inner loop of the ``slo`` policy.

Every admission evaluates every waiting request against the active set (step latency with it,
slack, whether it fits). A Python loop costs about 2 us per candidate, so filling 12 slots from
100 waiting requests would take milliseconds; as numpy arrays over the queue an evaluation is a
few dozen microseconds whatever the queue length up to a few hundred. What does not depend on
the active set is priced once per request, at ``add_request`` (``RequestCosts``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from patchedserve.request import Request
from patchedserve.scheduler.deadline import entry_of, standalone_s
from patchedserve.scheduler.features import FEATURE_NAMES, Entry, MixSums
from patchedserve.scheduler.predictor import LatencyPredictor

_RESOLUTIONS = FEATURE_NAMES.index("resolutions")
_PATCH_GROUPS = FEATURE_NAMES.index("patch_groups")


@dataclass(frozen=True)
class RequestCosts:
    """The model's figures for one request that do not depend on its batch (no online correction)."""

    entry: Entry
    """(width, height, CFG on)."""
    resolution_id: int
    """Small integer naming the request's (width, height) in this scheduler."""
    additive_s: float
    """Seconds the request adds to a step through the additive features."""
    patches: int
    """Patches of one branch (its attention group)."""
    solo_step_s: float
    """One step of the request alone."""
    decode_s: float
    """VAE decode of its image."""
    standalone_s: float
    """Whole request alone (encode, all steps, decode): the unit of slack."""
    step_budget_s: float
    """Longest step that lets it make its deadline if it joins on arrival: (objective - encode -
    decode) / steps; inf without a deadline. Its class's tightness for ``SchedulerConfig.reserve``."""


def request_costs(request: Request, predictor: LatencyPredictor, resolution_id: int) -> RequestCosts:
    entry = entry_of(request)
    additive_s, patches = predictor.entry_terms(entry)
    decode_s = predictor.overhead.decode_s(entry[0], entry[1])
    step_budget_s = math.inf
    if request.deadline_s is not None:
        fixed_s = predictor.overhead.encode_s + decode_s
        step_budget_s = (request.deadline_s - request.arrival_s - fixed_s) / max(request.params.steps, 1)
    return RequestCosts(
        entry=entry,
        resolution_id=resolution_id,
        additive_s=additive_s,
        patches=patches,
        solo_step_s=predictor.solo_step_s(entry, corrected=False),
        decode_s=decode_s,
        standalone_s=max(standalone_s(request, predictor), 1e-9),
        step_budget_s=step_budget_s,
    )


class QueueView:
    """Arrays over the waiting requests, in queue order; valid while the queue does not change.

    Waiting requests do not advance, so nothing here goes stale between ``schedule`` calls; the
    online correction and the active set enter only in ``evaluate``.
    """

    def __init__(self, requests: list[Request], costs: Sequence[RequestCosts], best_effort: set[int]) -> None:
        self.source = requests
        """The queue list this view was built from (its identity tells whether the view is current)."""
        self.requests = list(requests)
        self.costs = list(costs)
        rows = [
            (
                c.additive_s,
                c.solo_step_s,
                c.decode_s,
                c.standalone_s,
                r.steps_left,
                math.inf if r.deadline_s is None else r.deadline_s,
                c.resolution_id,
                c.patches,
                r.request_id in best_effort,
                c.step_budget_s,
            )
            for r, c in zip(requests, costs, strict=True)
        ]
        table = np.array(rows, dtype=float).reshape(-1, 10).T.copy()  # [10, W]
        self.additive_s, self.solo_step_s, self.decode_s, self.standalone_s = table[:4]  # each [W]
        self.steps_left, self.deadline_s = table[4], table[5]  # [W]
        self.resolution_id = table[6].astype(np.int64)  # [W]
        self.patches = table[7].astype(np.int64)  # [W]
        self.best_effort = table[8].astype(bool)  # [W]
        self.step_budget_s = table[9]  # [W]
        self.open = np.ones(len(requests), dtype=bool)  # [W] still in the queue in this call

    def need_alone_s(self, predictor: LatencyPredictor) -> np.ndarray:  # [W]
        """Time each request needs from now if it ran alone: encode, its steps, decode."""
        per_request = self.steps_left * self.solo_step_s + self.decode_s + predictor.overhead.encode_s
        return per_request * predictor.correction

    def evaluate(
        self,
        predictor: LatencyPredictor,
        active: MixSums,
        now_s: float,
        resolution_ids: dict[tuple[int, int], int],
    ) -> tuple[np.ndarray, np.ndarray]:  # ([W] step latency with the request, [W] slack)
        """Step latency of the active set plus each request, and each request's slack with it."""
        coef, correction = predictor.coef, predictor.correction
        present = np.zeros(len(resolution_ids) + 1, dtype=bool)  # [ids]
        for key in active.requests_per_resolution:
            present[resolution_ids.get(key, -1)] = True
        in_group = np.zeros(int(self.patches.max(initial=0)) + 2, dtype=bool)  # [max patches + 2]
        for n in active.entries_per_patch_count:
            in_group[min(n, len(in_group) - 1)] = True
        new_res = ~present[self.resolution_id]
        new_group = ~in_group[self.patches]
        added_s = self.additive_s + coef[_RESOLUTIONS] * new_res + coef[_PATCH_GROUPS] * new_group
        step_s = (predictor.model_s(active.vector()) + added_s) * correction
        remaining_s = self.steps_left * step_s + (self.decode_s + predictor.overhead.encode_s) * correction
        slack = (self.deadline_s - now_s - remaining_s) / self.standalone_s
        return step_s, slack

    def still_waiting(self) -> list[Request]:
        return [r for r, is_open in zip(self.requests, self.open, strict=True) if is_open]
