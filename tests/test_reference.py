"""The reference pipeline equals the diffusers pipeline of each family (<= 1/255 on the uint8 image)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from patchedserve.errors import InvalidRequestError
from patchedserve.models import load_model
from patchedserve.reference import ReferencePipeline, diffusers_generate

PROMPT = "a photo of a red cat on a city street at night"
SMALL = {"width": 128, "height": 96, "steps": 3, "seed": 7}
"""Small enough that one case runs in about a second on a 2-core CPU."""


def max_pixel_diff(a: object, b: object) -> int:
    return int(np.abs(np.asarray(a).astype(np.int16) - np.asarray(b).astype(np.int16)).max())


@pytest.mark.parametrize(
    ("name", "sampler", "guidance", "negative"),
    [
        ("tiny-sd15", "ddim", 7.5, ""),
        ("tiny-sd15", "dpmpp_2m", 1.0, ""),
        ("tiny-sdxl", "euler", 5.0, ""),
        ("tiny-sdxl", "euler", 5.0, "blurry, low quality"),
        ("tiny-sdxl", "dpmpp_2m", 1.0, ""),
        ("tiny-sd3", "flow_euler", 7.0, ""),
        ("tiny-sd3", "flow_euler", 1.0, ""),
    ],
)
def test_reference_equals_diffusers_pipeline(name: str, sampler: str, guidance: float, negative: str) -> None:
    pipeline = ReferencePipeline.from_model(name)
    kwargs = {**SMALL, "guidance_scale": guidance, "sampler": sampler, "negative_prompt": negative}
    ours = pipeline.generate(PROMPT, **kwargs)  # type: ignore[arg-type]
    theirs = diffusers_generate(pipeline.bundle, PROMPT, **kwargs)  # type: ignore[arg-type]
    assert ours.image.size == theirs.size == (128, 96)
    assert max_pixel_diff(ours.image, theirs) <= 1
    assert np.asarray(ours.image).std() > 1  # not a blank image: the comparison means something


def test_result_carries_latents_params_and_timings() -> None:
    result = ReferencePipeline.from_model("tiny-sd3").generate(PROMPT, **SMALL)  # type: ignore[arg-type]
    assert result.latents.shape == (16, 12, 16)
    assert (result.params.width, result.params.height, result.params.sampler) == (128, 96, "flow_euler")
    assert set(result.timings) == {"encode_s", "denoise_s", "decode_s", "total_s"}
    assert all(v >= 0 for v in result.timings.values())
    assert result.timings["total_s"] >= result.timings["denoise_s"]


def test_seed_decides_the_image() -> None:
    pipeline = ReferencePipeline.from_model("tiny-sdxl")
    a = pipeline.generate(PROMPT, **{**SMALL, "steps": 2})  # type: ignore[arg-type]
    b = pipeline.generate(PROMPT, **{**SMALL, "steps": 2})  # type: ignore[arg-type]
    c = pipeline.generate(PROMPT, **{**SMALL, "steps": 2, "seed": 8})  # type: ignore[arg-type]
    assert torch.equal(a.latents, b.latents) and not torch.equal(a.latents, c.latents)


def test_loaded_folder_generates_the_same_image(saved_model: Callable[[str], Path]) -> None:
    builtin = ReferencePipeline.from_model("tiny-sdxl").generate(PROMPT, **SMALL)  # type: ignore[arg-type]
    loaded = ReferencePipeline.from_model(str(saved_model("tiny-sdxl")))
    assert loaded.bundle is not load_model("tiny-sdxl")
    again = loaded.generate(PROMPT, **SMALL, sampler="euler", guidance_scale=5.0)  # type: ignore[arg-type]
    assert torch.equal(builtin.latents, again.latents)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"width": 100}, "width"),
        ({"steps": 0}, "steps"),
        ({"guidance_scale": 51.0}, "guidance_scale"),
        ({"negative_prompt": 5}, "negative_prompt"),
        ({"negative_prompt": "n" * 32_001}, "negative_prompt"),
    ],
)
def test_bad_requests_fail_before_any_work(kwargs: dict[str, object], field: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        ReferencePipeline.from_model("tiny-sdxl").generate(PROMPT, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field


def test_progress_bar_only_when_asked(capsys: pytest.CaptureFixture[str]) -> None:
    pipeline = ReferencePipeline.from_model("tiny-sd3")
    pipeline.generate(PROMPT, **{**SMALL, "steps": 2})  # type: ignore[arg-type]
    assert "denoise" not in capsys.readouterr().err
    pipeline.generate(PROMPT, **{**SMALL, "steps": 2}, progress=True)  # type: ignore[arg-type]
    err = capsys.readouterr().err
    assert "denoise" in err and "2/2" in err
