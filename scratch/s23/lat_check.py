"""Caller-side latency (submit call to done-callback) against the engine's own latency_s."""
import time
from functools import partial

from patchedserve.engine import Engine
from patchedserve.request import GenerationRequest

with Engine.from_model("tiny-sdxl", patch_size=64) as engine:
    done = {}
    futures = []
    for i in range(12):
        t0 = time.monotonic()
        (f,) = engine.submit_many([GenerationRequest(f"p{i}", width=64 * (1 + i % 2), height=64, steps=4)])
        f.add_done_callback(partial(lambda i, t0, _: done.__setitem__(i, time.monotonic() - t0), i, t0))
        futures.append(f)
        time.sleep(0.05)
    results = [f.result() for f in futures]
    time.sleep(0.1)
    diffs = [done[i] - r.timings["latency_s"] for i, r in enumerate(results)]
    print(f"caller - engine latency: min {min(diffs)*1e6:.0f} us, max {max(diffs)*1e6:.0f} us over {len(diffs)}")
