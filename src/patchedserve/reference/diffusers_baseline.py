"""`diffusers_generate`: the same request run through the diffusers pipeline of the bundle's family.

Used by the tests (and benchmarks) as the oracle the reference pipeline and the patched engine must
match: same components, the diffusers scheduler that the chosen sampler reproduces, same seed.
"""

from __future__ import annotations

from typing import Any

import PIL.Image
import torch

from patchedserve.models import ModelBundle, validate_generation
from patchedserve.sampler import make_diffusers_scheduler


@torch.inference_mode()
def diffusers_generate(
    bundle: ModelBundle,
    prompt: str,
    negative_prompt: str = "",
    width: int | None = None,
    height: int | None = None,
    steps: int | None = None,
    guidance_scale: float | None = None,
    seed: int = 0,
    sampler: str | None = None,
) -> PIL.Image.Image:
    """The diffusers pipeline's image for the request `ReferencePipeline.generate` takes.

    An empty negative prompt is passed as None, which is what "no negative prompt" means to
    diffusers (and what makes SDXL zero it when ``force_zeros_for_empty_prompt`` is set).
    """
    params = validate_generation(bundle, width, height, steps, guidance_scale, sampler, seed)
    scheduler = make_diffusers_scheduler(params.sampler, bundle.scheduler_config)
    pipe: Any = bundle.diffusers_pipeline(scheduler)
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        prompt=prompt,
        negative_prompt=negative_prompt or None,
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(params.seed),
        output_type="pil",
    )
    return result.images[0]
