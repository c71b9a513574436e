"""``RayEngineGroup``: one model served by N engine replicas on a Ray cluster, as one ``ServedEngine``.

Each replica is an ``EngineReplica`` actor: its own process with its own engine and model copy,
placed by Ray on any machine of the cluster, with one GPU when the engine runs on CUDA (seen there
as ``cuda``) or else a share of the CPUs (``cpus_per_replica``, also its torch threads). The group
is what ``patchedserve serve --replicas N`` puts behind the HTTP server:

- ``submit_many`` sends each request, or each image of an ``n``-image group, to the replica with
  the least predicted outstanding work at that moment (``replica_actor.outstanding_work``, the
  simulator's dispatch rule), so a group spreads over idle replicas; the replica validates and
  queues it or refuses it with the engine's own error, and a group is queued whole or not at all;
- each result comes back through the replica's ``result`` call, under a group-wide request id, and
  is shown to the observers before the caller's future resolves;
- a poller thread relays the replicas' steps to the observers every ``poll_s`` and keeps their
  queue sizes and patch-cache counts, which the server's /health and /metrics read (so those lag
  by up to ``poll_s``);
- a replica that dies fails its open requests with ``ReplicaLostError`` and is left out of dispatch
  while Ray restarts it (a fresh engine); it is back once it answers a poll.

Ray is imported here and by ``bench.replicas`` only, so nothing else needs it installed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import threading
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import ray
import torch
from ray.exceptions import GetTimeoutError, RayError, RayTaskError

from patchedserve.cluster.replica_actor import (
    EngineReplica,
    ReplicaInfo,
    ReplicaReport,
    wall_minus_monotonic_s,
)
from patchedserve.engine import EngineConfig, EngineObserver, GenerationResult, QueueFullError
from patchedserve.engine.served import CacheUsage, ServedModel
from patchedserve.errors import InvalidRequestError, PatchedServeError, ReplicaLostError
from patchedserve.request import GenerationRequest

log = logging.getLogger(__name__)

START_TIMEOUT_S = 600.0
"""How long replicas may take to be placed and load their model."""
CALL_TIMEOUT_S = 60.0
"""How long a dispatch or control call on a replica may take."""
POLL_TIMEOUT_S = 5.0
"""How long a poll waits for a replica's report before it counts the replica as down."""


class RayEngineGroup:
    """Serves ``model`` from ``replicas`` engine replicas; see the module docstring.

    Args:
        model: built-in name or diffusers folder (a folder must exist on every machine, at the
            same path; a relative one is taken from this process's directory, as is a profile).
        options: ``EngineConfig`` fields; checked here, the device on each replica's machine.
        replicas: how many engines.
        address: Ray cluster to join (``auto``, ``ray://host:10001``); None starts or joins the
            local one as ``ray.init`` does.
        cpus_per_replica: CPUs Ray reserves for each replica, which its engine uses as torch threads
            on a CPU device (default: 1 on CUDA, else the cluster's CPUs shared out).
        poll_s: seconds between polls of the replicas' steps and queue sizes.
    """

    def __init__(
        self,
        model: str,
        options: dict[str, Any],
        replicas: int,
        *,
        address: str | None = None,
        cpus_per_replica: int | None = None,
        poll_s: float = 0.25,
    ) -> None:
        if replicas < 1:
            raise InvalidRequestError(f"replicas must be at least 1; got {replicas}", field="replicas")
        if cpus_per_replica is not None and cpus_per_replica < 1:
            raise InvalidRequestError("cpus_per_replica must be at least 1", field="cpus_per_replica")
        checked = EngineConfig(**{**options, "device": "cpu"})  # every other option is refused here, at once
        self.max_waiting = checked.max_waiting
        """Each replica's queue size."""
        gpu = device_type(options.get("device", "cpu")) == "cuda"
        self.options = {**options, "device": "cuda"} if gpu else dict(options)
        if self.options.get("profile") is not None:
            self.options["profile"] = absolute_if_local(self.options["profile"])
        self.observers: list[EngineObserver] = []
        self.poll_s = poll_s
        self.dispatched = [0 for _ in range(replicas)]
        """Submits sent to each replica so far."""
        self.last_replica: int | None = None
        """Replica the latest submit went to."""
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            ray.init(address=address, include_dashboard=False, configure_logging=False)
        if cpus_per_replica is None:
            cpus_per_replica = default_cpus_per_replica(replicas, gpu)
        try:
            check_room(replicas, cpus_per_replica, gpu)
        except InvalidRequestError:
            if self._owns_ray:
                ray.shutdown()
            raise
        actor = ray.remote(EngineReplica).options(
            num_cpus=cpus_per_replica, num_gpus=1 if gpu else 0, max_restarts=-1
        )
        threads = None if gpu else cpus_per_replica
        model = absolute_if_local(model)
        self._actors: list[Any] = [actor.remote(model, self.options, threads) for _ in range(replicas)]
        """Handles of the ``EngineReplica`` actors (Ray's stubs type them loosely)."""
        self.replicas: list[ReplicaInfo] = []
        try:
            self.replicas = ray.get([a.info.remote() for a in self._actors], timeout=START_TIMEOUT_S)
        except RayError as err:  # GetTimeoutError too
            self.shutdown()
            raise start_error(err) from None
        self.served_model: ServedModel = self.replicas[0].served
        self._ids = itertools.count()
        self._where: dict[int, tuple[int, int]] = {}
        """Group request id -> (replica index, the replica's request id), while open."""
        self._lock = threading.Lock()
        self._last = [ReplicaReport(0, 0) for _ in self._actors]
        self.up = [True for _ in self._actors]
        """Per replica: whether it answered its last call (dispatch passes over those that did not)."""
        self._started = False
        self._stop = threading.Event()
        self._poller: threading.Thread | None = None

    # ------------------------------------------------------------------ what the server reads
    @property
    def num_waiting(self) -> int:
        return sum(r.num_waiting for r in self._last)

    @property
    def num_running(self) -> int:
        return sum(r.num_running for r in self._last)

    @property
    def replicas_up(self) -> list[bool]:
        return [self._started and up for up in self.up]

    @property
    def has_patch_cache(self) -> bool:
        return self.options.get("patch_cache") is not None

    def patch_cache_usage(self) -> CacheUsage:
        return sum((r.cache for r in self._last), CacheUsage())

    # ------------------------------------------------------------------ requests
    def submit_many(self, gens: Sequence[GenerationRequest]) -> list[Future[GenerationResult]]:
        """Queue ``gens`` all or none, each on the replica with the least work once the ones before
        it are placed (errors as ``Engine.submit_many``: the engine's ``InvalidRequestError``;
        ``QueueFullError`` once every replica's queue is full, after cancelling what this call
        had queued; a group larger than all the queues together is an ``InvalidRequestError`` on
        ``n``)."""
        room = self.max_waiting * len(self._actors)
        if len(gens) > room:
            raise InvalidRequestError(
                f"{len(gens)} images at once exceed this server's queues ({room} in all)", field="n"
            )
        futures: list[Future[GenerationResult]] = []
        with self._lock:  # load, choose and queue as one, so concurrent submits see each other
            loads = self._loads()  # then kept by each placement's answer, not asked again
            try:
                for gen in gens:
                    futures.append(self._place(gen, loads))
            except BaseException:
                for f in futures:
                    self.cancel(f.request_id)  # type: ignore[attr-defined]
                raise
        return futures

    def _place(self, gen: GenerationRequest, loads: dict[int, float]) -> Future[GenerationResult]:
        """Queue ``gen`` on the least-loaded replica of ``loads`` that has room; that replica's
        entry becomes its load with ``gen``, and one that is lost leaves ``loads``."""
        full: QueueFullError | None = None
        for index in sorted(loads, key=lambda i: (loads[i], i)):
            try:
                (local_id,), loads[index] = call(self._actors[index].submit_many.remote([gen]))
            except QueueFullError as err:  # the next has more work but may have room
                full = err
                continue
            except ReplicaLostError as err:  # it died since it told its load: try the next
                self._mark(index, False, err)
                del loads[index]
                continue
            self.dispatched[index] += 1
            self.last_replica = index
            return self._track(index, local_id)
        if full is not None:
            raise full
        raise ReplicaLostError("no replica is up to take the request; retry once one is back")

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Generate every request, each dispatched on its own (blocking); results in input order."""
        futures = [f for g in requests for f in self.submit_many([g])]
        return [f.result() for f in futures]

    def warm_up(self, gens: Sequence[GenerationRequest]) -> None:
        """Runs ``gens`` on every replica, each on its own, and starts their predictors afresh: what a
        benchmark replay does first (``bench.replay.warm_up``), so no replica meets the trace cold."""
        call([a.warm_up.remote(list(gens)) for a in self._actors], START_TIMEOUT_S)

    def log_steps(self, start_s: float) -> None:
        """Every replica logs its steps from now on, times from ``start_s`` (``time.monotonic`` here;
        sent as a wall-clock instant, which each replica moves onto its own machine's clock)."""
        start_wall_s = start_s + wall_minus_monotonic_s()
        call([a.log_steps.remote(start_wall_s) for a in self._actors])

    def logged_steps(self) -> list[tuple[list[Any], list[Any]]]:
        """Per replica, what ``log_steps`` logged (``EngineReplica.logged_steps``)."""
        result: list[tuple[list[Any], list[Any]]] = call([a.logged_steps.remote() for a in self._actors])
        return result

    def _loads(self) -> dict[int, float]:
        """Outstanding work of each replica that is up and answers."""
        refs = {i: a.load.remote() for i, a in enumerate(self._actors) if self.up[i]}
        loads: dict[int, float] = {}
        for i, ref in refs.items():
            try:
                loads[i] = ray.get(ref, timeout=CALL_TIMEOUT_S)
            except RayError as err:
                self._mark(i, False, err)
        return loads

    def _mark(self, index: int, up: bool, err: Exception | None = None) -> None:
        if self.up[index] != up:
            self.up[index] = up
            if up:
                log.warning("replica %d is back", index)
            else:
                log.warning("replica %d is down: %s", index, first_line(err) if err else "")

    def _track(self, index: int, local_id: int) -> Future[GenerationResult]:
        request_id = next(self._ids)
        future: Future[GenerationResult] = Future()
        future.request_id = request_id  # type: ignore[attr-defined]
        self._where[request_id] = (index, local_id)
        remote = self._actors[index].result.remote(local_id).future()
        remote.add_done_callback(partial(self._relay, request_id, index, future))
        return future

    def _relay(
        self, request_id: int, index: int, future: Future[GenerationResult], remote: Future[Any]
    ) -> None:
        self._where.pop(request_id, None)
        try:
            result: GenerationResult = replace(remote.result(), request_id=request_id)
        except Exception as err:
            log.error("replica %d lost request %d: %s", index, request_id, err)
            with contextlib.suppress(InvalidStateError):
                future.set_exception(ReplicaLostError(f"replica {index} failed: {first_line(err)}"))
            return
        for o in self.observers:  # before the future, as the engine does
            try:
                o.on_result(result)
            except Exception:
                log.exception("observer %r failed on request %d", o, request_id)
        with contextlib.suppress(InvalidStateError):
            future.set_result(result)

    def cancel(self, request_id: int) -> None:
        """Cancel a request wherever it runs (no-op once it ended)."""
        where = self._where.get(request_id)
        if where is not None:
            index, local_id = where
            self._actors[index].cancel.remote(local_id)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Run the replicas' loops (they start running at creation) and the poller."""
        call([a.start.remote() for a in self._actors])
        self._started = True
        if self._poller is None:
            self._stop.clear()
            self._poller = threading.Thread(target=self._poll_loop, name="replica-poller", daemon=True)
            self._poller.start()

    def stop(self) -> None:
        """Stop every replica's loop (their held requests are answered, cancelled) and the poller."""
        self._started = False
        self._stop.set()
        if self._poller is not None:
            self._poller.join()
            self._poller = None
        with contextlib.suppress(RayError):
            ray.get([a.stop.remote() for a in self._actors], timeout=CALL_TIMEOUT_S)
        self.poll()

    def shutdown(self) -> None:
        """``stop``, then end the replicas' processes, and Ray when this group started it."""
        if self._actors and self.replicas:
            self.stop()
        for a in self._actors:
            ray.kill(a)
        self._actors = []
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> RayEngineGroup:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ------------------------------------------------------------------ the poller
    def poll(self) -> None:
        """Take each replica's report now: relay its steps, keep its queue sizes and cache counts."""
        reports: list[ReplicaReport] = []
        for i, a in enumerate(self._actors):
            try:
                reports.append(ray.get(a.report.remote(), timeout=POLL_TIMEOUT_S))
                self._mark(i, True)
            except RayError as err:  # down, or restarting: it holds nothing now
                self._mark(i, False, err)
                reports.append(ReplicaReport(0, 0))
        self._last = reports
        for report in reports:
            for step in report.steps:
                for o in self.observers:
                    try:
                        o.on_step(*step)
                    except Exception:
                        log.exception("observer %r failed on a step", o)

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            self.poll()


def call(value: Any, timeout_s: float = CALL_TIMEOUT_S) -> Any:
    """``ray.get``'s value; a replica's own error (a bad request, a full queue) raised as itself."""
    try:
        return ray.get(value, timeout=timeout_s)
    except RayTaskError as err:
        if isinstance(err.cause, PatchedServeError):
            raise err.cause from None
        raise ReplicaLostError(f"a replica failed: {first_line(err)}") from None
    except RayError as err:  # the actor died, is restarting, or did not answer in time
        raise ReplicaLostError(f"a replica could not be reached: {first_line(err)}") from None


def absolute_if_local(path: str) -> str:
    """A model folder or profile that exists here, made absolute: replicas do not share this cwd
    (on other machines the file must be at the same path); anything else (a model name) as it is."""
    return str(Path(path).resolve()) if Path(path).exists() else path


def device_type(name: str) -> str:
    """``cpu`` or ``cuda``; whether this machine has the device is checked where each replica runs."""
    try:
        kind = torch.device(name).type
    except RuntimeError as err:
        message = f"device {name!r} is not a torch device (cpu, cuda): {err}"
        raise InvalidRequestError(message, "device") from err
    if kind not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device {name!r}: only cpu and cuda are supported", "device")
    return kind


def default_cpus_per_replica(replicas: int, gpu: bool) -> int:
    """CPUs (and torch threads) a replica gets unless told: 1 beside a GPU, else the Ray cluster's
    CPUs shared out (Ray must be initialised)."""
    return 1 if gpu else max(1, int(ray.cluster_resources().get("CPU", 1)) // replicas)


def check_room(replicas: int, cpus: int, gpu: bool) -> None:
    """Refuse at once replicas the cluster, as it is now, cannot hold (Ray would wait for them)."""
    have = ray.cluster_resources()
    if replicas * cpus > have.get("CPU", 0) or (gpu and replicas > have.get("GPU", 0)):
        raise InvalidRequestError(
            f"{replicas} replica(s) need {replicas * cpus} CPUs{f' and {replicas} GPUs' if gpu else ''}; the "
            f"Ray cluster has {have.get('CPU', 0):g} CPUs and {have.get('GPU', 0):g} GPUs",
            field="replicas",
        )


def start_error(err: Exception) -> PatchedServeError:
    """Why the replicas did not start, in one line."""
    if isinstance(err, GetTimeoutError):
        return PatchedServeError(f"the replicas did not start within {START_TIMEOUT_S:.0f} s")
    # Ray gives the creation task's traceback as text; its last line is the error, module-qualified.
    lines = str(getattr(err, "error_msg", err)).strip().splitlines() or [type(err).__name__]
    why = re.sub(r"^(\w+\.)+(?=\w+: )", "", lines[-1])
    return PatchedServeError(f"a replica failed to start: {why}")


def first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__
