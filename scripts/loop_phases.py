"""Where the engine loop's time goes during a real replay: the step, and what runs between steps.

Wraps the methods of ``Engine`` (and the scheduler's ``schedule``) with timers for the length of
one ``patchedserve bench slo`` invocation, then prints each phase's calls, total and mean. The
step latency the step log records is ``batch.sync`` + ``batch.step``; everything else
``Engine.step`` does (admitting, preparing, retiring) falls in the gaps between logged steps,
which ``cluster.speed.admission_gap_s`` reads. A benchmark probe, not a test:

    .venv/bin/python scripts/loop_phases.py bench slo --model tiny-sdxl --systems patchedserve --qps 1 \\
        --duration 30 ...   (any ``bench slo`` arguments)
"""

from __future__ import annotations

import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from patchedserve import cli
from patchedserve.engine.batch import DenoiseBatch
from patchedserve.engine.engine import Engine
from patchedserve.engine.image_batch import ImageBatch
from patchedserve.scheduler.base import QueueScheduler

TIMES: dict[str, list[float]] = defaultdict(list)
"""Phase name -> seconds of each call."""


def timed(owner: type, method: str, name: str) -> None:
    """Replace ``owner.method`` with a wrapper that records each call's wall time under ``name``."""
    inner: Callable[..., Any] = getattr(owner, method)

    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return inner(self, *args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - start)

    setattr(owner, method, wrapper)


def main(argv: list[str]) -> int:
    for method in ("step", "_drain_inbox", "_prepare", "_retire"):
        timed(Engine, method, f"Engine.{method}")
    for batch in (DenoiseBatch, ImageBatch):
        for method in ("sync", "step"):
            timed(batch, method, f"batch.{method}")
    timed(QueueScheduler, "schedule", "scheduler.schedule")
    code = cli.main(argv)
    print(f"{'phase':<20} {'calls':>6} {'total s':>9} {'mean ms':>9} {'median ms':>10}")
    for name, values in sorted(TIMES.items()):
        print(
            f"{name:<20} {len(values):>6} {sum(values):>9.3f} {1e3 * statistics.fmean(values):>9.2f} "
            f"{1e3 * statistics.median(values):>10.2f}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
