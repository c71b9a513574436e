"""The denoising batch: every running request's latents in patch form, carried across steps.

``DenoiseBatch`` owns two CSP layouts:

* the *request layout* (one entry per running request) over which latents and sampler history live
  as dense ``[N, C, p, p]`` tensors between steps, so a step never splits or merges images;
* the *model layout* (one entry per branch: conditional, plus unconditional under classifier-free
  guidance) that the patched model runs on; its input is one gather from the request rows.

Both, and every index derived from them, are rebuilt only when the running set changes; kept
requests' rows move with one gather. Used by ``engine.Engine`` once per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from patchedserve.layout import CSPLayout, merge_patches, split_latents
from patchedserve.patch import PatchBatch, PatchedModel
from patchedserve.request import Request
from patchedserve.sampler import Sampler


@dataclass
class _Composition:
    """Everything derived from one running set (rebuilt when it changes)."""

    requests: list[Request]  # in request-layout order
    layout: CSPLayout  # entries = requests (ids = request_id)
    model_layout: CSPLayout  # entries = branches (ids = 2*request_id + is_uncond)
    model_rows: torch.Tensor  # [N_model] long: request row each model patch reads
    cond_rows: torch.Tensor  # [N] long: model row of each request row's conditional output
    uncond_rows: torch.Tensor  # [N] long: ... unconditional output (= cond_rows without CFG)
    guidance: torch.Tensor  # [N, 1, 1, 1] guidance scale per row (1 without CFG)
    entry_request: list[int]  # [R_model] index into ``requests`` of each model entry
    embeds: torch.Tensor  # [R_model, L, D]
    pooled: torch.Tensor | None  # [R_model, Dp]
    time_ids: torch.Tensor | None  # [R_model, 6]
    sampler_rows: list[tuple[Sampler, list[int], torch.Tensor, torch.Tensor]]
    # per sampler: request indices, their rows [n] and local row->request map [n]


class DenoiseBatch:
    """Latents of the running requests in patch form, and one denoising step over all of them."""

    def __init__(self, model: PatchedModel, samplers: dict[str, Sampler], device: torch.device) -> None:
        self.model = model
        self.samplers = samplers
        self.device = device
        self.comp: _Composition | None = None
        self.latents: torch.Tensor | None = None  # [N, C, p, p]
        self.history: torch.Tensor | None = None  # [N, C, p, p] second-order sampler memory

    # ------------------------------------------------------------------ composition
    def sync(self, running: Sequence[Request], paused: Sequence[Request] = ()) -> None:
        """Make the batch hold exactly ``running``: new requests join with their initial noise, or
        where they left off; ``paused`` requests that leave keep their rows in their ``state``."""
        old = self.comp
        if old is not None and [r.request_id for r in old.requests] == [r.request_id for r in running]:
            return
        ids = [r.request_id for r in running]
        if old is not None and paused:
            self._park(old, {r.request_id for r in paused} - set(ids))
        if old is None:
            layout = self.model.layout_for([(r.params.height, r.params.width) for r in running], ids)
        else:
            keep = set(ids)
            layout = old.layout.without([i for i in old.layout.entry_ids if i not in keep])
            known = set(layout.entry_ids)
            new = [r for r in running if r.request_id not in known]
            vf = self.model.vae_scale_factor
            layout = layout.with_added(
                [(r.params.height // vf, r.params.width // vf) for r in new], [r.request_id for r in new]
            )
        by_id = {r.request_id: r for r in running}
        self._carry_rows(old, layout, by_id)
        self.comp = self._compose([by_id[i] for i in layout.entry_ids], layout)

    def _park(self, old: _Composition, leaving: set[int]) -> None:
        """Keep the rows of paused requests that leave the batch with them, for when they return."""
        assert self.latents is not None
        for r in old.requests:
            if r.request_id in leaving:
                a, b = old.layout.patch_range(r.request_id)
                history = None if self.history is None else self.history[a:b].clone()  # [n, C, p, p]
                r.state["parked"] = (self.latents[a:b].clone(), history)  # [n, C, p, p] each

    def _carry_rows(self, old: _Composition | None, layout: CSPLayout, by_id: dict[int, Request]) -> None:
        """Move kept requests' rows with one gather; fill joiners from where they were paused, or
        from their initial noise."""
        p, n = layout.patch_size, layout.num_patches
        ref = initial_latents(next(iter(by_id.values()))) if by_id else None
        if ref is None:
            self.latents = self.history = None
            return
        latents = torch.zeros(n, ref.shape[0], p, p, device=self.device, dtype=ref.dtype)
        history = torch.zeros_like(latents)
        if old is not None and self.latents is not None:
            index = torch.as_tensor(layout.patch_index_map(old.layout), device=self.device)
            kept = (index >= 0).nonzero().squeeze(1)
            latents[kept] = self.latents[index[kept]]
            if self.history is not None:
                history[kept] = self.history[index[kept]]
        known = set(old.layout.entry_ids) if old is not None else set()
        for rid in layout.entry_ids:
            if rid not in known:
                a, b = layout.patch_range(rid)
                parked = by_id[rid].state.pop("parked", None)
                if parked is not None:
                    latents[a:b] = parked[0]
                    if parked[1] is not None:
                        history[a:b] = parked[1]
                    continue
                start = initial_latents(by_id[rid])  # [C, h, w]
                latents[a:b] = split_latents(
                    [start], CSPLayout.build([(start.shape[-2], start.shape[-1])], p)
                )
        self.latents, self.history = latents, history

    def _compose(self, requests: list[Request], layout: CSPLayout) -> _Composition:
        sizes, ids, owner = [], [], []
        for i, r in enumerate(requests):
            for branch in range(r.num_entries):  # 0: conditional, 1: unconditional
                sizes.append(layout.sizes[i])
                ids.append(2 * r.request_id + branch)
                owner.append(i)
        model_layout = CSPLayout.build(sizes, layout.patch_size, ids)
        owner_of = dict(zip(ids, owner, strict=True))
        entry_request = [owner_of[e] for e in model_layout.entry_ids]
        rows = np.empty(model_layout.num_patches, dtype=np.int64)
        cond = np.empty(layout.num_patches, dtype=np.int64)
        uncond = np.empty(layout.num_patches, dtype=np.int64)
        for k, eid in enumerate(model_layout.entry_ids):
            a, b = int(model_layout.entry_offsets[k]), int(model_layout.entry_offsets[k + 1])
            ra, rb = layout.patch_range(eid // 2)
            rows[a:b] = np.arange(ra, rb)
            if eid % 2 == 0:
                cond[ra:rb] = np.arange(a, b)
            if eid % 2 == 1 or requests[owner_of[eid]].num_entries == 1:
                uncond[ra:rb] = np.arange(a, b)
        guidance = np.array(
            [
                requests[e].params.guidance_scale if requests[e].params.do_cfg else 1.0
                for e in layout.patch_entry
            ],
            dtype=np.float32,
        )
        embeds, pooled, time_ids = self._conditioning(requests, model_layout)
        return _Composition(
            requests=requests,
            layout=layout,
            model_layout=model_layout,
            model_rows=self._t(rows),
            cond_rows=self._t(cond),
            uncond_rows=self._t(uncond),
            guidance=self._t(guidance).view(-1, 1, 1, 1),
            entry_request=entry_request,
            embeds=embeds,
            pooled=pooled,
            time_ids=time_ids,
            sampler_rows=self._sampler_rows(requests, layout),
        )

    def _conditioning(
        self, requests: list[Request], model_layout: CSPLayout
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # [R, L, D], [R, Dp], [R, 6]
        by_id = {r.request_id: r for r in requests}
        conds = [by_id[eid // 2].state["uncond" if eid % 2 else "cond"] for eid in model_layout.entry_ids]
        embeds = torch.stack([c.prompt_embeds for c in conds])
        pooled = None if conds[0].pooled is None else torch.stack([c.pooled for c in conds])
        time_ids = None
        if "time_ids" in requests[0].state:
            time_ids = torch.stack([by_id[eid // 2].state["time_ids"] for eid in model_layout.entry_ids])
        return embeds, pooled, time_ids

    def _sampler_rows(
        self, requests: list[Request], layout: CSPLayout
    ) -> list[tuple[Sampler, list[int], torch.Tensor, torch.Tensor]]:
        groups: list[tuple[Sampler, list[int], torch.Tensor, torch.Tensor]] = []
        for name in sorted({r.params.sampler for r in requests}):
            members = [i for i, r in enumerate(requests) if r.params.sampler == name]
            rows = np.concatenate([np.arange(*layout.patch_range(requests[i].request_id)) for i in members])
            local = np.repeat(np.arange(len(members)), [requests[i].num_patches for i in members])
            groups.append((self.samplers[name], members, self._t(rows), self._t(local)))
        return groups

    def _t(self, a: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(a, device=self.device)

    # ------------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> None:
        """One denoising step for every running request; advances each ``step_index``."""
        comp, x = self.comp, self.latents
        assert comp is not None and x is not None
        reqs = comp.requests
        model_in = torch.empty_like(x)
        for sampler, members, rows, local in comp.sampler_rows:
            plans = [reqs[i].state["plan"] for i in members]
            steps = [reqs[i].step_index for i in members]
            model_in[rows] = sampler.scale_model_input(x[rows], plans, steps, local)
        t = torch.stack([reqs[i].state["plan"].timesteps[reqs[i].step_index] for i in comp.entry_request])
        out = self.model.forward_batch(
            PatchBatch(
                comp.model_layout,
                model_in[comp.model_rows],
                t.to(self.device),
                comp.embeds,
                comp.pooled,
                comp.time_ids,
            )
        )  # [N_model, C, p, p]
        cond, uncond = out[comp.cond_rows], out[comp.uncond_rows]
        guided = uncond + comp.guidance.to(out.dtype) * (cond - uncond)  # [N, C, p, p]
        history = self.history
        for sampler, members, rows, local in comp.sampler_rows:
            plans = [reqs[i].state["plan"] for i in members]
            steps = [reqs[i].step_index for i in members]
            hist = None if history is None or sampler.order == 1 else history[rows]
            new_x, new_h = sampler.step(x[rows], guided[rows], hist, plans, steps, local)
            x[rows] = new_x.to(x.dtype)
            if new_h is not None and history is not None:
                history[rows] = new_h.to(history.dtype)
        for r in reqs:
            r.step_index += 1

    def final_latents(self, request: Request) -> torch.Tensor:  # [C, h, w]
        """The request's current latents as one image (read before it leaves the batch)."""
        assert self.comp is not None and self.latents is not None
        a, b = self.comp.layout.patch_range(request.request_id)
        single = CSPLayout.build(
            [self.comp.layout.sizes[self.comp.layout.entry_ids.index(request.request_id)]],
            self.comp.layout.patch_size,
        )
        return merge_patches(self.latents[a:b], single)[0]


def initial_latents(request: Request) -> torch.Tensor:  # [C, h, w]
    """Where a request starts: its noise, or a cached intermediate latent (``ApproxCache``)."""
    return request.state.get("start_latents", request.state["noise"])
