"""`scripts/seed_pairs.py`: systems pair by the trace they replayed, across folders."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from script_module import load_script


def write_sweep(folder: Path, trace_text: str, runs: dict[str, tuple[int, int]], qps: float = 2.0) -> Path:
    """A bench slo output folder: one trace at ``qps`` and ``runs`` (system -> (met, requests))."""
    trace = folder / "traces" / "qps2_slo5.jsonl"
    trace.parent.mkdir(parents=True)
    trace.write_text(trace_text)
    results = {
        "meta": {"traces": [{"qps": qps, "slo_scale": 5.0, "duration_s": 60.0, "path": str(trace)}]},
        "runs": [
            {"system": s, "qps": qps, "slo_scale": 5.0, "met": met, "requests": n, "replicas": 1}
            for s, (met, n) in runs.items()
        ],
    }
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_runs_of_one_trace_pair_across_folders(tmp_path: Path) -> None:
    script = load_script("seed_pairs")
    folders = [
        write_sweep(tmp_path / "k_seed1", "trace one\n", {"ref": (8, 10)}),
        write_sweep(tmp_path / "k_seed2", "trace two\n", {"ref": (5, 10)}),
        # The other system ran later, in folders of their own, on the same two traces.
        write_sweep(tmp_path / "b_seed2", "trace two\n", {"other": (7, 10)}),
        write_sweep(tmp_path / "b_seed1", "trace one\n", {"other": (6, 10)}),
    ]
    rows = {r["system"]: r for r in script.compare(folders, "ref")}
    assert rows["other"]["satisfaction"] == {"k_seed1": 0.6, "k_seed2": 0.7}
    assert math.isclose(rows["other"]["pooled"], 13 / 20)
    pair = rows["other"]["reference_minus_pp"]
    assert math.isclose(pair["mean"], 0.0)  # +20 pp on trace one, -20 pp on trace two
    assert (pair["ahead"], pair["level"], pair["behind"]) == (1, 0, 1)


def test_different_traces_do_not_pair(tmp_path: Path) -> None:
    script = load_script("seed_pairs")
    folders = [
        write_sweep(tmp_path / "a", "trace one\n", {"ref": (8, 10)}),
        write_sweep(tmp_path / "b", "trace two\n", {"other": (6, 10)}),
    ]
    rows = {r["system"]: r for r in script.compare(folders, "ref")}
    assert "reference_minus_pp" not in rows["other"]
    assert rows["other"]["satisfaction"] == {"b": 0.6}


def test_a_system_replaying_one_trace_twice_is_an_error(tmp_path: Path) -> None:
    script = load_script("seed_pairs")
    folders = [
        write_sweep(tmp_path / "a", "trace one\n", {"ref": (8, 10)}),
        write_sweep(tmp_path / "b", "trace one\n", {"ref": (7, 10)}),
    ]
    with pytest.raises(ValueError, match="twice"):
        script.compare(folders, "ref")
    rows = {r["system"]: r for r in script.compare(folders, "ref", rerun=True)}
    assert rows["ref"]["satisfaction"] == {"a": 0.7}  # the later folder's run counts


def test_runs_at_two_slo_scales_are_compared_one_scale_at_a_time(tmp_path: Path) -> None:
    script = load_script("seed_pairs")
    folder = write_sweep(tmp_path / "a", "trace one\n", {"ref": (8, 10), "other": (6, 10)})
    results = json.loads((folder / "results.json").read_text())
    tight = [{**run, "slo_scale": 3.0, "met": run["met"] - 4} for run in results["runs"]]
    results["runs"] += tight  # the same trace replayed again at 3x: ref 4 of 10, other 2
    (folder / "results.json").write_text(json.dumps(results))
    with pytest.raises(ValueError, match="--slo-scale"):
        script.compare([folder], "ref")
    for scale, (ref, other) in ((5.0, (0.8, 0.6)), (3.0, (0.4, 0.2))):
        rows = {r["system"]: r for r in script.compare([folder], "ref", slo_scale=scale)}
        assert rows["ref"]["satisfaction"] == {"a": ref} and rows["other"]["satisfaction"] == {"a": other}
        assert math.isclose(rows["other"]["reference_minus_pp"]["mean"], 20.0)


def test_an_alias_pairs_a_variant_as_the_system_it_stands_for(tmp_path: Path) -> None:
    script = load_script("seed_pairs")
    folders = [
        # The variant ran the reference's configuration; the folder's own ref run is set aside.
        write_sweep(tmp_path / "a", "trace one\n", {"ref": (1, 10), "variant": (9, 10), "other": (8, 10)}),
    ]
    rows = {r["system"]: r for r in script.compare(folders, "ref", aliases={"variant": "ref"})}
    assert set(rows) == {"ref", "other"}
    assert rows["ref"]["satisfaction"] == {"a": 0.9}
    assert math.isclose(rows["other"]["reference_minus_pp"]["mean"], 10.0)


def test_an_alias_must_name_both_sides() -> None:
    from patchedserve.bench.results import parse_aliases

    assert parse_aliases(["x=y", "p=q=r"]) == {"x": "y", "p": "q=r"}
    for bad in (["x"], ["=y"], ["x="]):
        with pytest.raises(ValueError, match="OLD=NEW"):
            parse_aliases(bad)
