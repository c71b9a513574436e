"""How much slower a batch shape's first step runs than its later ones, from a run's step log.

Each step in ``DIR/steps/*.jsonl`` (written by ``bench slo``: ``[time_s, seconds, entries]``) is
divided by the cost file's prediction for it. A step is *first-seen* when its run had not yet run
that shape: its total patch count for patched execution (the convolution shapes depend on nothing
else), its set of requests for image-level execution. A large first-seen ratio is set-up paid once
per shape (on a GPU: per-shape kernel plans, first allocations).

    .venv/bin/python scripts/first_shape_steps.py outputs/gpu11/run2/res/replay \\
        --image-cost outputs/gpu11/run2/res/sdxl-arch_image_cost.json \\
        --patched-cost outputs/gpu11/run2/res/sdxl-arch_patched_cost.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

from patchedserve.bench.systems import SYSTEMS
from patchedserve.scheduler import Entry, LatencyPredictor


def shape_key(entries: list[Entry], execution: str, patch_size: int) -> object:
    """What makes a step's shape new: total patches (patched) or the set of requests (image)."""
    if execution == "patched":
        return sum(-(-w // patch_size) * -(-h // patch_size) * (2 if cfg else 1) for w, h, cfg in entries)
    return tuple(sorted(entries))


def split(steps: list[list[Any]], execution: str, cost: LatencyPredictor) -> dict[str, Any]:
    """First-seen and later steps: counts, median measured/predicted, first-seen share of time."""
    seen: set[object] = set()
    first: list[tuple[float, float]] = []
    later: list[tuple[float, float]] = []
    for _, seconds, raw, *_ in steps:
        entries: list[Entry] = [(int(w), int(h), bool(cfg)) for w, h, cfg in raw]
        key = shape_key(entries, execution, cost.patch_size)
        (later if key in seen else first).append((seconds / cost.predict_step(entries), seconds))
        seen.add(key)
    total = sum(s for _, s in first + later)
    return {
        "first": len(first),
        "first_ratio": statistics.median(r for r, _ in first) if first else float("nan"),
        "first_share": sum(s for _, s in first) / total if total else float("nan"),
        "later": len(later),
        "later_ratio": statistics.median(r for r, _ in later) if later else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, help="a bench slo --out folder")
    parser.add_argument("--image-cost", type=Path, required=True)
    parser.add_argument("--patched-cost", type=Path, required=True)
    args = parser.parse_args()
    costs = {
        "image": LatencyPredictor.load(args.image_cost),
        "patched": LatencyPredictor.load(args.patched_cost),
    }
    execution = {name: spec.execution for name, spec in SYSTEMS.items()}
    print("run                          first  ratio  share  later  ratio")
    for path in sorted((args.run / "steps").glob("*.jsonl")):
        system = path.stem.split("_")[0]
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        r = split(steps, execution[system], costs[execution[system]])
        print(
            f"{path.stem:28s} {r['first']:5d} {r['first_ratio']:6.2f} {r['first_share']:6.0%} "
            f"{r['later']:6d} {r['later_ratio']:6.2f}"
        )


if __name__ == "__main__":
    main()
