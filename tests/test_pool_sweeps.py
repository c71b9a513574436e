"""`scripts/pool_sweeps.py`: one load's figures over all of its traces, on the same traces for all."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from script_module import load_script


def outcome(index: int, latency_s: float | None, status: str = "finished") -> dict[str, Any]:
    return {
        "index": index,
        "size": "256x256",
        "arrival_s": float(index),
        "status": status,
        "latency_s": latency_s,
        "slo_s": 2.0,
    }


def write_sweep(folder: Path, trace: str, runs: dict[str, list[dict[str, Any]]], qps: float = 1.0) -> Path:
    """A bench slo folder with one trace (text ``trace``, 10 s) and per-system outcomes."""
    (folder / "traces").mkdir(parents=True)
    (folder / "outcomes").mkdir()
    path = folder / "traces" / "qps1_slo5.jsonl"
    path.write_text(trace)
    meta = {"traces": [{"qps": qps, "slo_scale": 5.0, "duration_s": 10.0, "path": str(path)}]}
    rows = []
    for system, outcomes in runs.items():
        (folder / "outcomes" / f"{system}_1r_{qps:g}qps.jsonl").write_text(
            "".join(json.dumps(o) + "\n" for o in outcomes)
        )
        rows.append({"system": system, "qps": qps, "slo_scale": 5.0, "replicas": 1})
    (folder / "results.json").write_text(json.dumps({"meta": meta, "runs": rows}))
    return folder


def test_pools_every_request_of_a_loads_traces_once(tmp_path: Path) -> None:
    script = load_script("pool_sweeps")
    met, late, dropped = outcome(0, 1.0), outcome(1, 3.0), outcome(2, None, "dropped")
    folders = [
        write_sweep(tmp_path / "seed1", "one\n", {"ref": [met, met], "other": [late, dropped]}),
        write_sweep(tmp_path / "seed2", "two\n", {"ref": [met, late, dropped]}),
        # The other system on trace two, from a later invocation.
        write_sweep(tmp_path / "later2", "two\n", {"other": [met, met, met]}),
    ]
    runs, left_out = script.pool(folders, "ref")
    assert left_out == []
    by = {r["system"]: r for r in runs}
    assert by["ref"]["requests"] == by["other"]["requests"] == 5
    assert math.isclose(by["ref"]["slo_satisfaction"], 3 / 5)
    assert math.isclose(by["other"]["slo_satisfaction"], 3 / 5)
    assert math.isclose(by["other"]["goodput_rps"], 3 / 20.0)  # over both traces' 10 s
    assert by["other"]["traces"] == 2 and math.isclose(by["other"]["drop_rate"], 1 / 5)


def test_a_system_on_other_traces_is_left_out_at_that_load(tmp_path: Path) -> None:
    script = load_script("pool_sweeps")
    folders = [
        write_sweep(tmp_path / "seed1", "one\n", {"ref": [outcome(0, 1.0)], "other": [outcome(0, 1.0)]}),
        write_sweep(tmp_path / "seed2", "two\n", {"ref": [outcome(0, 1.0)]}),
    ]
    runs, left_out = script.pool(folders, "ref")
    assert [r["system"] for r in runs] == ["ref"]
    assert left_out == ["other at 1 req/s: ran 1 traces, 1 of the 2 of ref"]


def test_one_trace_twice_for_a_system_is_an_error(tmp_path: Path) -> None:
    script = load_script("pool_sweeps")
    folders = [
        write_sweep(tmp_path / "a", "one\n", {"ref": [outcome(0, 1.0)]}),
        write_sweep(tmp_path / "b", "one\n", {"ref": [outcome(0, 1.0)]}),
    ]
    with pytest.raises(ValueError, match="twice"):
        script.pool(folders, "ref")


def test_a_rerun_in_a_later_folder_replaces_the_earlier_run(tmp_path: Path) -> None:
    script = load_script("pool_sweeps")
    folders = [
        write_sweep(tmp_path / "old", "one\n", {"ref": [outcome(0, 9.0)], "other": [outcome(0, 1.0)]}),
        write_sweep(tmp_path / "new", "one\n", {"ref": [outcome(0, 1.0)]}),
    ]
    runs, left_out = script.pool(folders, "ref", rerun=True)
    assert not left_out
    assert {r["system"]: r["slo_satisfaction"] for r in runs} == {"ref": 1.0, "other": 1.0}


def test_an_alias_counts_a_run_for_the_system_it_stands_for(tmp_path: Path) -> None:
    script = load_script("pool_sweeps")
    met, late = outcome(0, 1.0), outcome(1, 3.0)
    folders = [
        write_sweep(tmp_path / "old", "one\n", {"ref": [late, late]}),
        # A later invocation ran ref's configuration as "variant" beside a ref that is set aside.
        write_sweep(tmp_path / "new", "one\n", {"ref": [late, late], "variant": [met, met]}),
    ]
    runs, left_out = script.pool(folders, "ref", rerun=True, aliases={"variant": "ref"})
    assert left_out == [] and [r["system"] for r in runs] == ["ref"]
    assert runs[0]["slo_satisfaction"] == 1.0  # the variant's outcomes, not either ref run's
    plain, _ = script.pool(folders, "ref", rerun=True)
    assert {r["system"]: r["slo_satisfaction"] for r in plain} == {"ref": 0.0, "variant": 1.0}
