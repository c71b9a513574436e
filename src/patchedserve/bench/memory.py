"""Peak-memory probes for benchmarks: CUDA allocator peaks, or sampled malloc in-use bytes on CPU.

On CPU, RSS is useless for this (glibc keeps freed memory, so a second run adds nothing), so the
probe samples glibc's ``mallinfo2`` in-use bytes (heap plus mmapped blocks) from a thread. Short
peaks between samples can be missed; the number is a lower bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


def _malloc_in_use() -> Callable[[], int] | None:
    path = ctypes.util.find_library("c")
    if path is None:
        return None
    libc = ctypes.CDLL(path)
    if not hasattr(libc, "mallinfo2"):
        return None
    libc.mallinfo2.restype = _MallInfo2

    def in_use() -> int:
        info = libc.mallinfo2()
        return int(info.uordblks + info.hblkhd)

    return in_use


_IN_USE = _malloc_in_use()


@dataclass
class PeakMemory:
    """Peak extra memory of a block, in MiB; ``how`` names what was measured."""

    mib: float | None = None
    how: str = "not measured"


@contextlib.contextmanager
def peak_memory(device: torch.device, interval_s: float = 0.0005) -> Iterator[PeakMemory]:
    """Measure the peak memory a block adds: CUDA allocator peak, else sampled malloc in-use bytes."""
    result = PeakMemory()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        torch.cuda.synchronize(device)
        result.mib = (torch.cuda.max_memory_allocated(device) - base) / 2**20
        result.how = "cuda max_memory_allocated above the starting allocation"
        return
    read = _IN_USE
    if read is None:
        yield result
        return
    base = read()
    peak = [base]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], read())
            stop.wait(interval_s)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        result.mib = (peak[0] - base) / 2**20
        result.how = "glibc malloc in-use bytes sampled every 0.5 ms, above the start (a lower bound)"
