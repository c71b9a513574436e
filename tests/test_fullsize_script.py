"""The full-size models' scripts (`scripts/gpu_fullsize.py`, the prepared GPU check, and
`scripts/fullsize_engine_check.py`) run at tiny widths on the CPU, so they keep working between
the sessions that have a GPU or the time to build a full-size model."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from patchedserve.bench.step import random_mix
from patchedserve.models import load_model
from patchedserve.patch import PatchedModel
from script_module import load_script
from test_patch_exact import REL_TOL


def tiny_patched() -> PatchedModel:
    bundle = load_model("tiny-sdxl")
    return PatchedModel(bundle.denoiser, 64, bundle.vae_scale_factor)


def test_size_list_is_width_by_height() -> None:
    assert load_script("gpu_fullsize")._sizes_hw("512x256,64x64") == [(256, 512), (64, 64)]


def test_exactness_on_cpu_reports_float32_within_the_tests_bound() -> None:
    script = load_script("gpu_fullsize")
    sizes = [(128, 64), (64, 64)]  # (height, width)
    report = script.exactness(tiny_patched(), torch.device("cpu"), sizes)
    assert set(report) == {"sizes_hw", "fp32"}  # TF32 and float16 are GPU questions
    assert len(report["fp32"]) == len(sizes)
    assert all(0.0 <= err <= REL_TOL for err in report["fp32"])


def test_rel_err_sees_a_wrong_output() -> None:
    script = load_script("gpu_fullsize")
    ref = torch.randn(4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert script.rel_err(ref.clone(), ref) == 0.0
    wrong = ref.clone()
    wrong[0, 0, 0] += ref.abs().max()  # off by the largest magnitude, up to float32 rounding
    assert math.isclose(script.rel_err(wrong, ref), 1.0, rel_tol=1e-6)


def test_time_mix_times_the_three_executions() -> None:
    script = load_script("gpu_fullsize")
    pm = tiny_patched()
    sizes = [(64, 64), (64, 64), (128, 64), (128, 64)]  # two requests, two CFG rows each
    mix = random_mix(pm, sizes, torch.device("cpu"), torch.float32)
    run = script.time_mix(pm, mix, requests=2, device=torch.device("cpu"), repeats=2)
    assert set(run["median_s"]) == {"per_request", "per_resolution", "patched"}
    assert all(len(v) == 2 and all(t > 0.0 for t in v) for v in run["all_s"].values())
    assert run["num_patches"] == 2 * 1 + 2 * 2
    assert math.isclose(
        run["per_request_over_patched"], run["median_s"]["per_request"] / run["median_s"]["patched"]
    )


def test_engine_check_reports_each_request_against_diffusers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "engine.json"
    argv = ["fullsize_engine_check.py", "--model", "tiny-sdxl", "--patch-size", "64", "--json", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    load_script("fullsize_engine_check").main()
    report = json.loads(out.read_text())
    assert [r["size"] for r in report["requests"]] == ["256x128", "128x128"]
    assert all(r["max_pixel_diff"] <= 2 and r["image_std"] > 1 for r in report["requests"])
