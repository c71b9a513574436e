"""``SchedulerConfig``: the knobs of every scheduling policy, checked on construction.

Built by the engine (from its own config or the server's ``--policy``/``--on-infeasible`` flags)
and passed to ``make_scheduler``.
"""

from __future__ import annotations

from dataclasses import dataclass

from patchedserve.errors import InvalidRequestError

POLICIES: tuple[str, ...] = ("fcfs", "slo")
"""Policy names ``make_scheduler`` knows."""
RES_FCFS = "res-fcfs"
"""Same-resolution FCFS batches (``ResolutionBatchScheduler``), a baseline built on ``fcfs``'s config."""
ON_INFEASIBLE: tuple[str, ...] = ("drop", "best-effort")
"""What the ``slo`` policy does with a request that cannot make its deadline."""
ADMISSIONS: tuple[str, ...] = ("throughput", "least-slack")
"""How the ``slo`` policy picks among waiting requests (see ``scheduler.slo``)."""


@dataclass(frozen=True)
class SchedulerConfig:
    """How a policy admits requests."""

    policy: str = "slo"
    """``fcfs`` (arrival order) or ``slo`` (least slack first, admission control)."""
    max_running: int = 12
    """Most requests in the active set (the paper's batch cap)."""
    slo_scale: float = 5.0
    """A request without ``slo_ms`` gets deadline = arrival + slo_scale x its standalone latency."""
    on_infeasible: str = "drop"
    """``drop``: refuse a request that cannot make its deadline even alone; ``best-effort``: keep it,
    served after every request that can still make its deadline."""
    admission: str = "throughput"
    """``throughput``: a request that would miss its deadline in the current batch waits for the
    batch to drain, and the fitting candidate that adds the most work per second of step time
    joins first; ``least-slack`` (the paper's rule): such a request is refused, and the least
    slack goes first unless slack is relaxed."""
    relaxed_slack: float = 1.0
    """``least-slack`` only: when the most urgent waiting request has more slack than this (spare
    time in units of its standalone latency), admit the candidate that adds the most work per
    second of step time."""
    reserve: bool = True
    """``slo`` policy: admit a request only if the requests of the tightest class seen lately
    (least time per step to its deadline, among the last ``reserve_window`` arrivals) that are
    expected while one of them is in the system could still join the batch on arrival; requests
    of that class are exempt. Keeps the step short enough for the most deadline-sensitive traffic
    instead of filling it with lenient requests (see ``scheduler.slo``)."""
    pause: bool = True
    """``slo`` policy: let an active request with time to spare sit a step out when that keeps an
    urgent one on course, and admit an urgent request that only fits with such pauses (see
    ``scheduler.pausing``)."""
    reserve_window: int = 32
    """Arrivals the ``reserve`` rule looks back over for the tightest class."""
    inline_decode: float = 2.0
    """``slo`` policy: how much longer a decode takes on the worker thread than alone. A request
    that can still make its deadline at the end of its denoising, but not on the worker (this
    factor x its predicted decode and those of the decodes it would wait for there, less what
    the running one has done), is decoded in the denoising loop instead, pausing the steps. On
    the worker a decode shares the CPU with the steps: on this project's 2-core test machine,
    the end of a 512x512 request's denoising to its image took a median 1.7x and a 90th
    percentile 3x the decode's time alone (session 12). 0 turns it off."""
    observe_steps: bool = True
    """Feed every executed step's latency to the predictor's online update."""

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise InvalidRequestError(
                f"policy must be one of {', '.join(POLICIES)}; got {self.policy!r}", field="policy"
            )
        if self.max_running < 1:
            raise InvalidRequestError(
                f"max_running must be at least 1; got {self.max_running}", "max_running"
            )
        if not self.slo_scale > 0.0:
            raise InvalidRequestError(f"slo_scale must be positive; got {self.slo_scale}", field="slo_scale")
        if self.on_infeasible not in ON_INFEASIBLE:
            raise InvalidRequestError(
                f"on_infeasible must be one of {', '.join(ON_INFEASIBLE)}; got {self.on_infeasible!r}",
                field="on_infeasible",
            )
        if self.admission not in ADMISSIONS:
            raise InvalidRequestError(
                f"admission must be one of {', '.join(ADMISSIONS)}; got {self.admission!r}", field="admission"
            )
        if self.reserve_window < 1:
            raise InvalidRequestError(
                f"reserve_window must be at least 1; got {self.reserve_window}", field="reserve_window"
            )
        if self.inline_decode < 0.0:
            raise InvalidRequestError(
                f"inline_decode must be >= 0; got {self.inline_decode}", field="inline_decode"
            )
        if self.relaxed_slack < 0.0:
            raise InvalidRequestError(
                f"relaxed_slack must be >= 0; got {self.relaxed_slack}", field="relaxed_slack"
            )


DEFAULT_PATCH_SIZE = 256
"""Patch side in pixels profiled by default: the engine's default patch size."""
DEFAULT_SIZES: tuple[tuple[int, int], ...] = (
    (256, 256),
    (512, 256),
    (256, 512),
    (512, 512),
    (768, 512),
    (512, 768),
    (768, 768),
)
"""(width, height) drawn for the requests of a mix: 1 to 9 patches of 256 px, square and not."""


@dataclass(frozen=True)
class ProfileConfig:
    """What ``run_profile`` measures."""

    patch_size: int = DEFAULT_PATCH_SIZE
    """Patch side in pixels; must be the engine's."""
    mixes: int = 200
    """Random mixes to time."""
    sizes: tuple[tuple[int, int], ...] = DEFAULT_SIZES
    """(width, height) of the requests, drawn uniformly."""
    max_requests: int = 12
    """Requests per mix are drawn uniformly from 1..max_requests (the engine's active-set cap)."""
    cfg_share: float = 0.5
    """Probability that a request runs classifier-free guidance."""
    repeats: int = 3
    """Timed runs of each mix, one per round; the median is kept."""
    clock: str = "auto"
    """``thread`` (CPU time of the calling thread), ``wall``, or ``auto`` (thread on a CPU with one
    intra-op thread, else wall); see the module docstring."""
    drift_window: int = 10
    """Runs on each side that estimate the machine's speed at a run (0: no drift correction)."""
    test_fraction: float = 0.25
    """Share of the mixes held out of the fit to measure the error."""
    seed: int = 0
    """Seed of the mix draw, the split and the inputs."""

    def __post_init__(self) -> None:
        if self.mixes < 4 or self.repeats < 1 or self.max_requests < 1 or not self.sizes:
            raise ValueError("need mixes >= 4, repeats >= 1, max_requests >= 1 and at least one size")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.clock not in ("auto", "thread", "wall") or self.drift_window < 0:
            raise ValueError(f"clock must be auto, thread or wall (got {self.clock!r}); drift_window >= 0")
