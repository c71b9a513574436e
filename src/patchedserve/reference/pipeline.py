"""`ReferencePipeline`: one request, full image, built from our own pieces.

It is the ground truth the patched engine is compared against, and what the CLI's ``generate`` runs
until the engine lands. It uses the same calls as the engine (`encode_prompts`, `denoiser_forward`,
the batched sampler, `decode_latents`), so any mismatch with diffusers shows up here first; the
test suite checks it against the diffusers pipeline of each family.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import PIL.Image
import torch
from tqdm.auto import tqdm

from patchedserve.models import (
    GenerationParams,
    ModelBundle,
    decode_latents,
    denoiser_forward,
    encode_prompts,
    load_model,
    sdxl_time_ids,
    stack_conditioning,
    validate_generation,
)
from patchedserve.models.validation import check_prompts
from patchedserve.request import GenerationRequest
from patchedserve.sampler import Sampler, get_sampler


@dataclass
class ReferenceResult:
    """What one `ReferencePipeline.generate` call produced."""

    image: PIL.Image.Image
    """The decoded RGB image."""
    latents: torch.Tensor
    """[C, h, w] final latents, before decoding."""
    params: GenerationParams
    """The validated parameters the image was made with (defaults filled in)."""
    timings: dict[str, float] = field(default_factory=dict)
    """Wall-clock seconds: encode_s, denoise_s, decode_s, total_s."""


@dataclass
class _Branches:
    """Denoiser inputs for one request, with the unconditional rows first when guidance is on."""

    prompt_embeds: torch.Tensor  # [R, L, D], R = 2 with guidance ([uncond, cond]) else 1
    pooled: torch.Tensor | None  # [R, Dp]
    time_ids: torch.Tensor | None  # [R, 6]


class ReferencePipeline:
    """Image-level generation of one request at a time with classifier-free guidance."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.bundle = bundle
        self._samplers: dict[str, Sampler] = {}  # per name; samplers cache their plans

    @classmethod
    def from_model(cls, model: str | ModelBundle) -> ReferencePipeline:
        """A pipeline for a built-in name, a local diffusers folder, or an already loaded bundle."""
        return cls(model if isinstance(model, ModelBundle) else load_model(model))

    @torch.inference_mode()
    def generate(
        self,
        prompt: str,
        negative_prompt: str = "",
        width: int | None = None,
        height: int | None = None,
        steps: int | None = None,
        guidance_scale: float | None = None,
        seed: int = 0,
        sampler: str | None = None,
        progress: bool = False,
    ) -> ReferenceResult:
        """Generates one image; None parameters take the model's defaults.

        Raises:
            InvalidRequestError: a parameter is out of range (see `validate_generation` and
                `check_prompts`).
        """
        check_prompts(prompt, negative_prompt)
        params = validate_generation(self.bundle, width, height, steps, guidance_scale, sampler, seed)
        start = time.perf_counter()
        branches = self._encode(prompt, negative_prompt, params)
        encoded = time.perf_counter()
        latents = self._denoise(branches, params, progress)
        denoised = time.perf_counter()
        image = decode_latents(self.bundle, latents)[0]
        done = time.perf_counter()
        timings = {
            "encode_s": encoded - start,
            "denoise_s": denoised - encoded,
            "decode_s": done - denoised,
            "total_s": done - start,
        }
        return ReferenceResult(image=image, latents=latents[0], params=params, timings=timings)

    def generate_request(self, request: GenerationRequest, progress: bool = False) -> ReferenceResult:
        """``generate`` with the fields of a ``GenerationRequest`` (the engine's request type)."""
        return self.generate(
            prompt=request.prompt,
            negative_prompt=request.negative_prompt,
            width=request.width,
            height=request.height,
            steps=request.steps,
            guidance_scale=request.guidance_scale,
            seed=request.seed,
            sampler=request.sampler,
            progress=progress,
        )

    def _encode(self, prompt: str, negative_prompt: str, params: GenerationParams) -> _Branches:
        if params.do_cfg:
            conds = encode_prompts(self.bundle, [negative_prompt, prompt], negative=[True, False])
        else:
            conds = encode_prompts(self.bundle, [prompt])
        embeds, pooled = stack_conditioning(conds)
        time_ids = None
        if self.bundle.family == "sdxl":
            time_ids = sdxl_time_ids(self.bundle, params.height, params.width).expand(len(conds), 6)
        return _Branches(embeds, pooled, time_ids)

    def _initial_noise(self, params: GenerationParams, sigma: float) -> torch.Tensor:
        """[1, C, h, w] noise drawn exactly as diffusers' pipelines draw it for a CPU generator."""
        scale = self.bundle.vae_scale_factor
        shape = (1, self.bundle.latent_channels, params.height // scale, params.width // scale)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        return noise.to(device=self.bundle.device, dtype=self.bundle.dtype) * sigma

    def _denoise(self, branches: _Branches, params: GenerationParams, progress: bool) -> torch.Tensor:
        """[1, C, h, w] latents after every step."""
        sampler = self._samplers.get(params.sampler)
        if sampler is None:
            sampler = get_sampler(params.sampler, self.bundle.scheduler_config)
            self._samplers[params.sampler] = sampler
        plan = sampler.plan(params.steps)
        latents = self._initial_noise(params, sampler.init_noise_sigma(plan))
        rows = torch.zeros(1, dtype=torch.long)
        history: torch.Tensor | None = None
        for i in tqdm(range(params.steps), disable=not progress, desc="denoise", unit="step"):
            model_in = sampler.scale_model_input(latents, [plan], [i], rows)
            # Same batch as diffusers ([uncond, cond] copies of one latent) so the numbers match.
            batch = torch.cat([model_in] * branches.prompt_embeds.shape[0])
            timestep = plan.timesteps[i].to(latents.device).expand(batch.shape[0])
            out = denoiser_forward(
                self.bundle, batch, timestep, branches.prompt_embeds, branches.pooled, branches.time_ids
            )
            if params.do_cfg:
                uncond, cond = out.chunk(2)
                out = uncond + params.guidance_scale * (cond - uncond)
            latents, history = sampler.step(latents, out, history, [plan], [i], rows)
        return latents
