"""Smoke tests of the step and burst benchmarks: they run and report what they name."""

import json
from pathlib import Path

from patchedserve.cli import main


def test_bench_step_writes_the_three_variants_and_shares(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    code = main(
        [
            "bench",
            "step",
            "--model",
            "tiny-sdxl",
            "--sizes",
            "64x64,128x64",
            "--per-size",
            "1,2",
            "--patch-size",
            "64",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert [r["per_size"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert set(run["median_s"]) == {"patched", "one_at_a_time", "same_res_batches"}
        assert all(v > 0 for v in run["median_s"].values())
        assert run["num_patches"] == run["per_size"] * (1 + 2)  # 64x64 is 1 patch, 128x64 is 2
        assert 0 < run["stitch_share"] < 1 and 0 <= run["regroup_share"] < 1
        assert (
            run["speedup_vs_one_at_a_time"] == run["median_s"]["one_at_a_time"] / run["median_s"]["patched"]
        )


def test_bench_burst_counts_every_image(tmp_path: Path) -> None:
    out = tmp_path / "burst.json"
    code = main(
        [
            "bench",
            "burst",
            "--model",
            "tiny-sdxl",
            "--sizes",
            "64x64,128x64",
            "--count",
            "3",
            "--steps",
            "2",
            "--patch-size",
            "64",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert report["engine_finished"] == 3
    assert report["speedup"] == report["reference_s"] / report["engine_s"]
