"""First-come-first-served admission with a cap on the active set (the paper's "Mixed-Cache")."""

from __future__ import annotations

from patchedserve.scheduler.base import QueueScheduler
from patchedserve.scheduler.interface import SchedulerOutput


class FCFSScheduler(QueueScheduler):
    """Admits waiting requests in arrival order while fewer than ``max_running`` are active."""

    policy = "fcfs"

    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        while self.waiting and len(self.running) < self.max_running:
            req = self.waiting.pop(0)
            self.running.append(req)
            out.admitted.append(req)
