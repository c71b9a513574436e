"""`scripts/step_work.py`: steps run and their cost per pixel, from a run's logs."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

from script_module import load_script


def write_jsonl(path: Path, rows: list[Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("name", ["nirvana_1r_2qps_slo5", "nirvana_1r_2qps"], ids=["named", "before-26"])
def test_counts_steps_against_those_asked_and_prices_them_per_megapixel(tmp_path: Path, name: str) -> None:
    script = load_script("step_work")
    trace: list[Any] = [
        {"format": "patchedserve-trace"},
        {"width": 1000, "height": 500, "steps": 4},
        {"width": 1000, "height": 1000, "steps": 4},
        {"width": 1000, "height": 1000, "steps": 4},
    ]
    write_jsonl(tmp_path / "traces" / "qps2_slo5.jsonl", trace)
    # Request 0 ran 2 of its 4 steps (started from a cached latent), request 1 all 4, request 2 was
    # dropped; request 1 finished late.
    steps = [[0.0, 0.5, [[1000, 500, True], [1000, 1000, False]]]] + [
        [t, 0.25, [[1000, 1000, False]]] for t in (1, 2, 3)
    ]
    steps.append([4.0, 0.5, [[1000, 500, True]]])
    write_jsonl(tmp_path / "steps" / f"{name}.jsonl", steps)
    outcomes = [
        {"index": 0, "status": "finished", "latency_s": 1.0, "slo_s": 2.0, "denoised_s": 0.5},
        {"index": 1, "status": "finished", "latency_s": 3.0, "slo_s": 2.0, "denoised_s": 1.9},
        {"index": 2, "status": "dropped"},
    ]
    write_jsonl(tmp_path / "outcomes" / f"{name}.jsonl", outcomes)
    totals: defaultdict[str, Any] = defaultdict(script.Work)
    script.add_run(tmp_path, totals)
    w = totals["nirvana"]
    assert (w.arrived, w.finished, w.met) == (3, 2, 1)
    assert w.late_in_tail == 1  # request 1 was on time when its denoising ended
    assert (w.request_steps, w.asked_steps) == (6, 8)
    assert math.isclose(w.step_share, 0.75)
    # 2 steps of a 0.5 MP image with CFG (1 MP each) and 4 of a 1 MP image without: 6 MP-steps.
    assert math.isclose(w.megapixel_steps, 6.0)
    assert math.isclose(w.step_s, 1.75)
    assert math.isclose(w.s_per_megapixel_step, 1.75 / 6.0)
