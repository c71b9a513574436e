"""CPU streams: one denoiser call split into parts that run side by side, each on its own threads.

On a CPU, one model call spread over all cores pays for every operator's parallel region (waking
threads, splitting small tensors), and a tiny-model step has thousands of operators. Running
independent parts of the batch at once, each on a share of the threads (one thread each on a
2-core machine), keeps every core busy with whole operators instead. It is exact: the parts are
whole entries (images, or CFG branches) and every operator that mixes rows works per entry, so a
part computes what the whole call computes for its rows, up to float rounding of GEMMs of another
size.

``resolve_streams`` picks the count (two on a CPU with at least two threads, one on CUDA, where
kernels already fill the device; ``set_default_streams`` overrides that for the process, as the
CLI's ``--streams`` does (``cli.apply_streams_arg``), like ``torch.set_num_threads`` for
threads); ``run_parts`` runs the parts; ``balanced_cuts`` splits a run of entries into
contiguous parts of about equal work.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")

_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()
_default: int | None = None


def set_default_streams(streams: int | None) -> None:
    """The count ``resolve_streams`` gives when none is asked for (None: decide by device)."""
    global _default
    if streams is not None and streams < 1:
        raise ValueError(f"streams must be at least 1; got {streams}")
    _default = streams


def resolve_streams(streams: int | None, device: torch.device) -> int:
    """The stream count to use: ``streams`` if given, else the process default, else 2 on a CPU
    with >= 2 threads and 1 otherwise."""
    if streams is None:
        streams = _default
    if streams is not None:
        if streams < 1:
            raise ValueError(f"streams must be at least 1; got {streams}")
        return streams
    return 2 if device.type == "cpu" and torch.get_num_threads() >= 2 else 1


def _pool(count: int, threads: int) -> ThreadPoolExecutor:
    """A shared pool of ``count`` workers that each run torch on ``threads`` threads."""
    with _pools_lock:
        pool = _pools.get((count, threads))
        if pool is None:
            pool = ThreadPoolExecutor(count, "stream", initializer=torch.set_num_threads, initargs=(threads,))
            _pools[(count, threads)] = pool
        return pool


def run_parts(fn: Callable[[T], R], parts: Sequence[T]) -> list[R]:
    """``[fn(p) for p in parts]``, the parts side by side on a share of the caller's threads each.

    The caller's grad and inference modes carry over (both are per thread in torch). One part runs
    in the caller's thread on all of its threads.
    """
    if len(parts) <= 1:
        return [fn(p) for p in parts]
    threads = max(1, torch.get_num_threads() // len(parts))
    grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()

    def call(part: T) -> R:
        with torch.inference_mode(inference), torch.set_grad_enabled(grad):
            return fn(part)

    futures = [_pool(len(parts), threads).submit(call, p) for p in parts]
    return [f.result() for f in futures]


def balanced_cuts(weights: Sequence[int], parts: int) -> list[tuple[int, int]]:
    """Split items ``0..n`` into at most ``parts`` contiguous non-empty runs ``[a, b)`` whose
    weight sums are as even as a greedy cut at each running-total target allows."""
    n = len(weights)
    parts = max(1, min(parts, n))
    total = sum(weights)
    cuts, start, acc = [], 0, 0
    for k in range(1, parts):
        target = total * k / parts
        end = start
        # advance while the next item brings the running total closer to the target
        while end < n - (parts - k) and abs(acc + weights[end] - target) <= abs(acc - target):
            acc += weights[end]
            end += 1
        if end == start:  # every run holds at least one item
            acc += weights[end]
            end += 1
        cuts.append((start, end))
        start = end
    cuts.append((start, n))
    return cuts
