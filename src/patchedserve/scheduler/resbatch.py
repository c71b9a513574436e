"""Same-resolution iteration-level batching (ORCA-style), FCFS: the ``res-batch`` baseline.

Image-level execution cannot batch different resolutions, so the active set holds one resolution
at a time: the oldest waiting request picks it when the active set is empty, and waiting requests
of the active resolution join at step boundaries in arrival order, up to ``max_running``.
"""

from __future__ import annotations

from patchedserve.scheduler.base import QueueScheduler
from patchedserve.scheduler.config import RES_FCFS
from patchedserve.scheduler.interface import SchedulerOutput


class ResolutionBatchScheduler(QueueScheduler):
    policy = RES_FCFS

    def _admit(self, now_s: float, out: SchedulerOutput) -> None:
        if not self.waiting or len(self.running) >= self.max_running:
            return
        current = self.running[0].resolution if self.running else self.waiting[0].resolution
        for req in list(self.waiting):
            if len(self.running) >= self.max_running:
                break
            if req.resolution == current:
                self.waiting.remove(req)
                self.running.append(req)
                out.admitted.append(req)
