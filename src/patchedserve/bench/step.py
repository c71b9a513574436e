"""``patchedserve bench step``: one patched denoising step over a mixed-resolution set.

Compares, side by side in one process (variants interleaved per repeat, medians reported):

* ``patched``: one ``PatchedModel.forward_batch`` over all requests' patches;
* ``one_at_a_time``: the model's own forward, one full image per call;
* ``same_res_batches``: the model's own forward, one batch per resolution.

An instrumented extra pass reports the share of the patched step spent in the Patch Edge Stitcher
(halo gathers) and in regrouping (attention outputs back to patches); latent split/merge, which
the engine pays only when a request joins or leaves, is reported on its own.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from patchedserve.bench.memory import peak_memory
from patchedserve.layout import merge_patches, split_latents
from patchedserve.models import load_model
from patchedserve.patch import PatchBatch, PatchedModel
from patchedserve.patch.context import Stopwatch

TEXT_LEN = 77


@dataclass
class Mix:
    """Random inputs of one step for ``sizes`` (height, width px), stacked per request."""

    sizes: list[tuple[int, int]]
    latents: list[torch.Tensor]  # each [C, h, w]
    timesteps: torch.Tensor  # [R]
    text: torch.Tensor  # [R, L, D]
    pooled: torch.Tensor | None  # [R, Dp]
    time_ids: torch.Tensor | None  # [R, 6]


def random_mix(
    pm: PatchedModel, sizes: list[tuple[int, int]], device: torch.device, dtype: torch.dtype
) -> Mix:
    g = torch.Generator().manual_seed(0)
    cfg = pm.model.config
    vf, r = pm.vae_scale_factor, len(sizes)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device, dtype)

    latents = [rand(cfg.in_channels, h // vf, w // vf) for h, w in sizes]
    timesteps = (torch.rand(r, generator=g) * 999).to(device)
    if pm.is_sd3:
        return Mix(
            sizes,
            latents,
            timesteps,
            rand(r, TEXT_LEN, cfg.joint_attention_dim),
            rand(r, cfg.pooled_projection_dim),
            None,
        )
    text = rand(r, TEXT_LEN, cfg.cross_attention_dim)
    if cfg.addition_embed_type == "text_time":
        dp = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        return Mix(sizes, latents, timesteps, text, rand(r, dp), rand(r, 6) * 1024)
    return Mix(sizes, latents, timesteps, text, None, None)


def full_forward(pm: PatchedModel, mix: Mix, idx: list[int]) -> torch.Tensor:  # [B, C, h, w]
    """The model's own forward over entries `idx` of `mix`, as one batch."""
    x = torch.stack([mix.latents[i] for i in idx])
    t, text = mix.timesteps[idx], mix.text[idx]
    if pm.is_sd3:
        assert mix.pooled is not None
        return pm.model(
            hidden_states=x,
            timestep=t,
            encoder_hidden_states=text,
            pooled_projections=mix.pooled[idx],
            return_dict=False,
        )[0]
    added = None
    if mix.time_ids is not None and mix.pooled is not None:
        added = {"text_embeds": mix.pooled[idx], "time_ids": mix.time_ids[idx]}
    return pm.model(x, t, encoder_hidden_states=text, added_cond_kwargs=added, return_dict=False)[0]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of one call of `fn`, with the device synchronised on both sides."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def mix_batch(pm: PatchedModel, mix: Mix) -> PatchBatch:
    """The mix as one patched call's inputs, in layout order."""
    layout = pm.layout_for(mix.sizes)
    order = list(layout.entry_ids)
    return PatchBatch(
        layout,
        split_latents([mix.latents[i] for i in order], layout),
        mix.timesteps[order],
        mix.text[order],
        None if mix.pooled is None else mix.pooled[order],
        None if mix.time_ids is None else mix.time_ids[order],
    )


@torch.no_grad()
def bench_mix(pm: PatchedModel, mix: Mix, repeats: int, device: torch.device) -> dict[str, Any]:
    batch = mix_batch(pm, mix)
    layout = batch.layout
    order = list(layout.entry_ids)
    by_size: dict[tuple[int, int], list[int]] = {}
    for i, s in enumerate(mix.sizes):
        by_size.setdefault(s, []).append(i)
    variants: dict[str, Callable[[], object]] = {
        "patched": lambda: pm.forward_batch(batch),
        "one_at_a_time": lambda: [full_forward(pm, mix, [i]) for i in range(len(mix.sizes))],
        "same_res_batches": lambda: [full_forward(pm, mix, idx) for idx in by_size.values()],
    }
    for fn in variants.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            times[name].append(time_call(fn, device))
    memory = {}
    for name, fn in variants.items():
        with peak_memory(device) as peak:
            fn()
        memory[name] = {"mib": peak.mib, "how": peak.how}
    median = {k: statistics.median(v) for k, v in times.items()}
    chunked = pm.max_patches_per_call is not None and layout.num_patches > pm.max_patches_per_call
    ctx = pm.context(layout, device)  # the cached context forward_batch will use
    ctx.stopwatch = Stopwatch()
    instrumented = time_call(lambda: pm.forward_batch(batch), device)
    sections, ctx.stopwatch = ctx.stopwatch.totals_s, None
    split_merge = time_call(
        lambda: merge_patches(split_latents([mix.latents[i] for i in order], layout), layout), device
    )
    return {
        "num_requests": len(mix.sizes),
        "num_patches": layout.num_patches,
        "median_s": median,
        "all_s": times,
        "speedup_vs_one_at_a_time": median["one_at_a_time"] / median["patched"],
        "speedup_vs_same_res_batches": median["same_res_batches"] / median["patched"],
        # Shares come from the whole-batch context; chunked calls use other contexts: not measured.
        "stitch_share": None if chunked else sections.get("stitch", 0.0) / instrumented,
        "regroup_share": None if chunked else sections.get("regroup", 0.0) / instrumented,
        "split_merge_s": split_merge,
        "peak_memory": memory,
    }


def run_step_bench(
    model: str,
    sizes: list[tuple[int, int]],
    per_size: list[int],
    patch_size: int,
    repeats: int,
    device: str,
    dtype: str,
    max_patches_per_call: int | None = None,
) -> dict[str, Any]:
    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    bundle = load_model(model)
    denoiser = bundle.denoiser.to(dev, torch_dtype)
    pm = PatchedModel(
        denoiser,
        patch_size=patch_size,
        vae_scale_factor=bundle.vae_scale_factor,
        max_patches_per_call=max_patches_per_call,
        streams=1,  # every variant is one call on all threads; `scripts/streams_probe.py` times streams
    )
    runs = []
    for k in per_size:
        mix = random_mix(pm, [s for s in sizes for _ in range(k)], dev, torch_dtype)
        runs.append({"per_size": k, **bench_mix(pm, mix, repeats, dev)})
    return {
        "model": model,
        "device": str(dev),
        "device_name": _device_name(dev),
        "dtype": dtype,
        "torch_threads": torch.get_num_threads(),
        "patch_size": patch_size,
        "max_patches_per_call": max_patches_per_call,
        "sizes": [f"{w}x{h}" for h, w in sizes],
        "repeats": repeats,
        "runs": runs,
    }


def _device_name(dev: torch.device) -> str:
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"


def write_report(report: dict[str, Any], path: Path | None) -> None:
    text = json.dumps(report, indent=2)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"{report['model']} on {report['device_name']} ({report['dtype']}), patch {report['patch_size']} px"
    ]
    for r in report["runs"]:
        m = r["median_s"]
        lines.append(
            f"  {r['per_size']} per size ({r['num_requests']} requests, {r['num_patches']} patches): "
            f"patched {m['patched'] * 1e3:.1f} ms, one-at-a-time {m['one_at_a_time'] * 1e3:.1f} ms "
            f"(x{r['speedup_vs_one_at_a_time']:.2f}), same-res batches {m['same_res_batches'] * 1e3:.1f} ms "
            f"(x{r['speedup_vs_same_res_batches']:.2f}); stitch {_share(r['stitch_share'])}, "
            f"regroup {_share(r['regroup_share'])}"
        )
    return lines


def _share(value: float | None) -> str:
    return "not measured (chunked)" if value is None else f"{value:.1%}"
