"""Image-level execution (the baselines' way): the model's own forward, one call per resolution.

Same interface as ``DenoiseBatch`` (``sync``, ``step``, ``final_latents``) so the engine loop,
schedulers and samplers are shared; only the model call differs. Each request keeps its latents as
one ``[C, h, w]`` tensor; a step stacks the requests of each resolution (both CFG branches, as
diffusers' pipelines do) and calls the denoiser once per resolution, in ``streams`` parts of about
equal rows side by side (``patchedserve.streams``), as the patched engine does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from patchedserve.engine.batch import initial_latents
from patchedserve.models import ModelBundle, denoiser_forward
from patchedserve.request import Request
from patchedserve.sampler import Sampler
from patchedserve.streams import balanced_cuts, resolve_streams, run_parts


class ImageBatch:
    """Latents of the running requests as whole images; one denoiser call per resolution."""

    def __init__(
        self,
        bundle: ModelBundle,
        samplers: dict[str, Sampler],
        device: torch.device,
        streams: int | None = None,
    ) -> None:
        self.bundle = bundle
        self.streams = resolve_streams(streams, device)
        self.samplers = samplers
        self.device = device
        self.requests: list[Request] = []
        self.latents: dict[int, torch.Tensor] = {}  # request_id -> [C, h, w]
        self.history: dict[int, torch.Tensor] = {}  # request_id -> [C, h, w]

    def sync(self, running: Sequence[Request], paused: Sequence[Request] = ()) -> None:
        """Step ``running`` next: joiners start from their initial noise, or where they left off;
        ``paused`` requests that leave keep their latents in their ``state`` (as ``DenoiseBatch``
        does, so a rebuilt batch finds them too)."""
        for r in paused:
            if r.request_id in self.latents:
                r.state["parked"] = (self.latents[r.request_id], self.history.get(r.request_id))
        ids = {r.request_id for r in running}
        for rid in [i for i in self.latents if i not in ids]:
            self.latents.pop(rid)
            self.history.pop(rid, None)
        for r in running:
            if r.request_id not in self.latents:
                parked = r.state.pop("parked", None)
                if parked is None:
                    self.latents[r.request_id] = initial_latents(r).clone()
                    continue
                self.latents[r.request_id] = parked[0]
                if parked[1] is not None:
                    self.history[r.request_id] = parked[1]
        self.requests = list(running)

    @torch.inference_mode()
    def step(self) -> None:
        groups: dict[tuple[tuple[int, int], str], list[Request]] = {}
        for r in self.requests:
            groups.setdefault((r.resolution, r.params.sampler), []).append(r)
        for members in groups.values():
            self._step_group(members)
        for r in self.requests:
            r.step_index += 1

    def _step_group(self, reqs: list[Request]) -> None:
        sampler = self.samplers[reqs[0].params.sampler]
        plans = [r.state["plan"] for r in reqs]
        steps = [r.step_index for r in reqs]
        rows = torch.arange(len(reqs), device=self.device)
        x = torch.stack([self.latents[r.request_id] for r in reqs])  # [B, C, h, w]
        x_in = sampler.scale_model_input(x, plans, steps, rows)
        cfg = [i for i, r in enumerate(reqs) if r.params.do_cfg]
        branches = [*[(i, "cond") for i in range(len(reqs))], *[(i, "uncond") for i in cfg]]
        conds = [reqs[i].state[key] for i, key in branches]
        pooled = None if conds[0].pooled is None else torch.stack([c.pooled for c in conds])
        time_ids = None
        if "time_ids" in reqs[0].state:
            time_ids = torch.stack([reqs[i].state["time_ids"] for i, _ in branches])
        t = torch.stack([plans[i].timesteps[steps[i]] for i, _ in branches]).to(self.device)
        sample = x_in[[i for i, _ in branches]]  # [B', C, h, w], B' = rows + CFG rows
        embeds = torch.stack([c.prompt_embeds for c in conds])  # [B', L, D]

        def forward(rows: tuple[int, int]) -> torch.Tensor:  # [b, C, h, w]
            a, b = rows
            return denoiser_forward(
                self.bundle,
                sample[a:b],
                t[a:b],
                embeds[a:b],
                None if pooled is None else pooled[a:b],
                None if time_ids is None else time_ids[a:b],
            )

        out = torch.cat(run_parts(forward, balanced_cuts([1] * len(branches), self.streams)))
        guided = out[: len(reqs)].clone()  # [B, C, h, w]
        for k, i in enumerate(cfg):
            uncond = out[len(reqs) + k]
            guided[i] = uncond + reqs[i].params.guidance_scale * (out[i] - uncond)
        hist = None
        if sampler.order > 1:
            hist = torch.stack([self.history.get(r.request_id, torch.zeros_like(x[0])) for r in reqs])
        new_x, new_h = sampler.step(x, guided, hist, plans, steps, rows)
        for i, r in enumerate(reqs):
            self.latents[r.request_id] = new_x[i]
            if new_h is not None:
                self.history[r.request_id] = new_h[i]

    def final_latents(self, request: Request) -> torch.Tensor:  # [C, h, w]
        return self.latents[request.request_id]
