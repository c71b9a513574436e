"""Request preparation before the first denoising step: prompts, sampler plan, initial noise.

Prompts of every request admitted in one iteration are encoded in one batch per text encoder.
Initial noise is drawn exactly as diffusers' pipelines draw it for a CPU generator, so a request's
image does not depend on what it was batched with. Called by ``Engine`` at admission.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchedserve.models import ModelBundle, encode_prompts, sdxl_time_ids
from patchedserve.request import Request
from patchedserve.sampler import Sampler, get_sampler


class Preparer:
    """Fills ``request.state`` with cond/uncond conditioning, plan, noise (and SDXL time ids)."""

    def __init__(self, bundle: ModelBundle, device: torch.device, dtype: torch.dtype) -> None:
        self.bundle = bundle
        self.device = device
        self.dtype = dtype
        self.samplers: dict[str, Sampler] = {}

    def sampler(self, name: str) -> Sampler:
        if name not in self.samplers:
            self.samplers[name] = get_sampler(name, self.bundle.scheduler_config)
        return self.samplers[name]

    @torch.inference_mode()
    def prepare(self, requests: Sequence[Request]) -> None:
        texts = [r.prompt for r in requests]
        flags = [False] * len(requests)
        cfg = [r for r in requests if r.params.do_cfg]
        texts += [r.negative_prompt for r in cfg]
        flags += [True] * len(cfg)
        conds = encode_prompts(self.bundle, texts, negative=flags)
        for r, c in zip(requests, conds[: len(requests)], strict=True):
            r.state["cond"] = c
        for r, c in zip(cfg, conds[len(requests) :], strict=True):
            r.state["uncond"] = c
        for r in requests:
            self._prepare_one(r)

    def _prepare_one(self, r: Request) -> None:
        p = r.params
        sampler = self.sampler(p.sampler)
        plan = sampler.plan(p.steps)
        vf = self.bundle.vae_scale_factor
        shape = (1, self.bundle.latent_channels, p.height // vf, p.width // vf)
        noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(p.seed), dtype=torch.float32)
        r.state["plan"] = plan
        r.state["noise"] = (noise.to(self.device, self.dtype) * sampler.init_noise_sigma(plan))[
            0
        ]  # [C, h, w]
        if self.bundle.family == "sdxl":
            r.state["time_ids"] = sdxl_time_ids(self.bundle, p.height, p.width).to(self.device, self.dtype)
