"""Samplers against their diffusers schedulers, and batched mixed-step stepping against solo stepping."""

from collections.abc import Mapping
from dataclasses import FrozenInstanceError
from typing import Any

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from hypothesis import given, settings
from hypothesis import strategies as st

from patchedserve.errors import InvalidRequestError
from patchedserve.sampler import (
    SAMPLER_NAMES,
    Sampler,
    SamplerPlan,
    get_sampler,
    make_diffusers_scheduler,
)

LATENT = (2, 4, 4)  # per-row latent shape [C, H, W]; small keeps the suite fast


def sdxl_config(**overrides: Any) -> dict[str, Any]:
    """SDXL base's scheduler/scheduler_config.json (EulerDiscreteScheduler), as a plain mapping."""
    return {
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "clip_sample": False,
        "interpolation_type": "linear",
        "num_train_timesteps": 1000,
        "prediction_type": "epsilon",
        "sample_max_value": 1.0,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "timestep_spacing": "leading",
        "trained_betas": None,
        "use_karras_sigmas": False,
        **overrides,
    }


def euler_object_config(**kwargs: Any) -> dict[str, Any]:
    """``dict(scheduler.config)`` of an EulerDiscreteScheduler built in code with SDXL's betas.

    Such a dict lists the keys left at their defaults in ``_use_default_values``, and diffusers drops
    those keys when the dict is loaded again, so overriding one by editing the dict has no effect.
    """
    sdxl = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": 1}
    return dict(EulerDiscreteScheduler(**{**sdxl, "timestep_spacing": "leading", **kwargs}).config)


def sd15_config(**overrides: Any) -> dict[str, Any]:
    """An SD1.5 scheduler_config.json (PNDM class, DDIM-style keys), as a plain mapping."""
    return {
        "_class_name": "PNDMScheduler",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000,
        "set_alpha_to_one": False,
        "skip_prk_steps": True,
        "steps_offset": 1,
        "clip_sample": False,
        "trained_betas": None,
        **overrides,
    }


def sd3_config(**overrides: Any) -> dict[str, Any]:
    """SD3's scheduler_config.json (FlowMatchEulerDiscreteScheduler, static shift 3)."""
    return {
        "_class_name": "FlowMatchEulerDiscreteScheduler",
        "num_train_timesteps": 1000,
        "shift": 3.0,
        **overrides,
    }


V = {"prediction_type": "v_prediction"}
CASES: dict[str, tuple[str, Mapping[str, Any]]] = {
    "euler-sdxl": ("euler", sdxl_config()),
    "euler-sdxl-v": ("euler", sdxl_config(**V)),
    "euler-sdxl-object": ("euler", euler_object_config()),
    "euler-sd15": ("euler", sd15_config()),
    "euler-linspace-linear": ("euler", sdxl_config(timestep_spacing="linspace", beta_schedule="linear")),
    "euler-trailing-sigma_min": (
        "euler",
        sdxl_config(timestep_spacing="trailing", final_sigmas_type="sigma_min"),
    ),
    "ddim-sd15": ("ddim", sd15_config()),
    "ddim-sd15-v": ("ddim", sd15_config(**V)),
    "ddim-trailing-alpha1": ("ddim", sd15_config(timestep_spacing="trailing", set_alpha_to_one=True)),
    "ddim-linspace-cosine": (
        "ddim",
        sd15_config(timestep_spacing="linspace", beta_schedule="squaredcos_cap_v2"),
    ),
    "dpmpp-sdxl": ("dpmpp_2m", sdxl_config()),
    "dpmpp-sdxl-object": ("dpmpp_2m", euler_object_config()),
    "dpmpp-sd15": ("dpmpp_2m", sd15_config()),
    "dpmpp-sd15-v": ("dpmpp_2m", sd15_config(**V)),
    "dpmpp-trailing": ("dpmpp_2m", sd15_config(timestep_spacing="trailing")),
    "dpmpp-linspace": ("dpmpp_2m", sd15_config(timestep_spacing="linspace")),
    "flow-sd3": ("flow_euler", sd3_config()),
    "flow-object": ("flow_euler", dict(FlowMatchEulerDiscreteScheduler(shift=3.0).config)),
}
# (num_steps, rows of the single request): every step count once, one and several rows.
STEPS_ROWS = [(1, 1), (2, 3), (3, 1), (7, 3), (20, 1), (25, 3)]


def assert_float32_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal up to float32 rounding at the tensor's scale.

    Random model outputs drive latents to |x| ~ 50, where diffusers' own float32 arithmetic (e.g.
    sample - (sample - sigma * eps)) loses a few ulps of |x|; an elementwise rtol would flag elements
    near zero in such a tensor. 2e-6 * scale is about 16 float32 ulps of the largest element.
    """
    scale = max(1.0, ref.abs().max().item())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=2e-6 * scale)


def run_against_diffusers(name: str, config: Mapping[str, Any], num_steps: int, rows: int) -> float:
    """Step one request of ``rows`` rows with the sampler and with diffusers; return the max abs diff."""
    sampler = get_sampler(name, config)
    ref = make_diffusers_scheduler(name, config)
    ref.set_timesteps(num_steps)
    plan = sampler.plan(num_steps)
    torch.testing.assert_close(plan.timesteps, ref.timesteps.to(torch.float32), rtol=0, atol=0)
    ref_sigma = float(getattr(ref, "init_noise_sigma", 1.0))  # flow matching has no such attribute
    assert sampler.init_noise_sigma(plan) == ref_sigma

    gen = torch.Generator().manual_seed(num_steps)
    x_ref = torch.randn(rows, *LATENT, generator=gen) * ref_sigma
    x, history = x_ref.clone(), None
    row_request = torch.zeros(rows, dtype=torch.long)
    max_diff = 0.0
    for k, t in enumerate(ref.timesteps):
        if name != "flow_euler":  # FlowMatchEulerDiscreteScheduler has no scale_model_input
            scaled = sampler.scale_model_input(x, [plan], [k], row_request)
            assert_float32_close(scaled, ref.scale_model_input(x_ref, t))
        model_output = torch.randn(rows, *LATENT, generator=gen)
        x_ref = ref.step(model_output, t, x_ref).prev_sample
        x, history = sampler.step(x, model_output, history, [plan], [k], row_request)
        assert_float32_close(x, x_ref)
        max_diff = max(max_diff, (x - x_ref).abs().max().item())
    assert (history is None) == (sampler.order == 1)
    return max_diff


@pytest.mark.parametrize(("num_steps", "rows"), STEPS_ROWS)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers_step_for_step(case: str, num_steps: int, rows: int) -> None:
    name, config = CASES[case]
    run_against_diffusers(name, config, num_steps, rows)


def test_config_overrides_reach_the_sampler() -> None:
    """Guards the cases above: an override must not silently fall back to a default."""
    for name, config in (CASES["euler-sdxl-v"], CASES["ddim-sd15-v"], CASES["dpmpp-sd15-v"]):
        assert get_sampler(name, config).config["prediction_type"] == "v_prediction"
    assert get_sampler("euler", euler_object_config(**V)).config["prediction_type"] == "v_prediction"


def test_registry_and_diffusers_oracles() -> None:
    assert SAMPLER_NAMES == ("euler", "ddim", "dpmpp_2m", "flow_euler")
    for name in SAMPLER_NAMES:
        config = sd3_config() if name == "flow_euler" else sd15_config()
        sampler = get_sampler(name, config)
        assert isinstance(sampler, Sampler) and sampler.name == name
        assert sampler.order == (2 if name == "dpmpp_2m" else 1)
    dpm = make_diffusers_scheduler("dpmpp_2m", sdxl_config())
    assert type(dpm).__name__ == "DPMSolverMultistepScheduler"
    assert (dpm.config.algorithm_type, dpm.config.solver_order, dpm.config.solver_type) == (
        "dpmsolver++",
        2,
        "midpoint",
    )
    assert dpm.config.timestep_spacing == "leading" and dpm.config.steps_offset == 1
    assert isinstance(make_diffusers_scheduler("ddim", sd15_config()), DDIMScheduler)


def test_unknown_sampler_names_the_allowed_ones() -> None:
    for call in (get_sampler, make_diffusers_scheduler):
        with pytest.raises(InvalidRequestError) as info:
            call("heun", sd15_config())
        assert info.value.field == "sampler"
        assert all(name in str(info.value) for name in SAMPLER_NAMES)


@pytest.mark.parametrize(
    ("name", "config", "needle"),
    [
        ("euler", sdxl_config(use_karras_sigmas=True), "use_karras_sigmas"),
        ("euler", sdxl_config(interpolation_type="log_linear"), "interpolation_type"),
        ("dpmpp_2m", sdxl_config(use_karras_sigmas=True), "use_karras_sigmas"),
        ("ddim", euler_object_config(), "clip_sample"),  # DDIMScheduler's default clip_sample is True
        ("ddim", sd15_config(thresholding=True), "thresholding"),
        ("ddim", sd15_config(prediction_type="sample"), "prediction_type"),
        ("euler", sdxl_config(rescale_betas_zero_snr=True), "rescale_betas_zero_snr"),
        ("flow_euler", sd3_config(use_dynamic_shifting=True), "use_dynamic_shifting"),
    ],
)
def test_unsupported_options_are_refused(name: str, config: Mapping[str, Any], needle: str) -> None:
    with pytest.raises(InvalidRequestError, match=needle) as info:
        get_sampler(name, config)
    assert info.value.field == "sampler"


def test_bad_step_counts_are_refused() -> None:
    sampler = get_sampler("euler", sdxl_config())
    for bad in (0, 1001):
        with pytest.raises(InvalidRequestError) as info:
            sampler.plan(bad)
        assert info.value.field == "num_steps"
    # diffusers' trailing spacing yields 62 timesteps for 61 steps; refuse rather than misalign.
    with pytest.raises(InvalidRequestError, match="62 timesteps"):
        get_sampler("ddim", sd15_config(timestep_spacing="trailing")).plan(61)


def test_plans_are_cached_and_frozen() -> None:
    sampler = get_sampler("dpmpp_2m", sdxl_config())
    plan = sampler.plan(20)
    assert sampler.plan(20) is plan and sampler.plan(7) is not plan
    assert isinstance(plan, SamplerPlan) and plan.coeffs.shape == (20, len(sampler.COEFFS))
    assert plan.timesteps.dtype == torch.float32 and plan.coeffs.dtype == torch.float64
    with pytest.raises(FrozenInstanceError):
        plan.num_steps = 3  # type: ignore[misc]


def test_step_rejects_misuse() -> None:
    sampler = get_sampler("dpmpp_2m", sd15_config())
    plan, x = sampler.plan(5), torch.zeros(2, *LATENT)
    rows = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match="history"):
        sampler.step(x, x, None, [plan], [2], rows)
    with pytest.raises(IndexError):
        sampler.step(x, x, None, [plan], [5], rows)
    with pytest.raises(ValueError, match="plan of sampler"):
        sampler.step(x, x, None, [get_sampler("ddim", sd15_config()).plan(5)], [0], rows)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_dtype_is_preserved(dtype: torch.dtype) -> None:
    sampler = get_sampler("dpmpp_2m", sd15_config())
    plan, rows = sampler.plan(4), torch.zeros(2, dtype=torch.long)
    x = torch.randn(2, *LATENT).to(dtype)
    x1, hist = sampler.step(x, x, None, [plan], [0], rows)
    x2, _ = sampler.step(x1, x, hist, [plan], [1], rows)
    assert x1.dtype == x2.dtype == dtype and torch.isfinite(x2.float()).all()


# ---- mixed batches: requests at different steps of different step counts share one tensor ----


def simulate(
    sampler: Sampler,
    requests: list[tuple[int, int, int]],  # (num_steps, join_tick, num_rows) per request
    joiner_history: float,
    only: int | None = None,
    device: str = "cpu",
) -> list[torch.Tensor]:  # per request: [num_rows, *LATENT] final latents
    """An engine loop in miniature: each tick steps every active request's rows in one batch.

    Model outputs depend only on (request, step), so a request's trajectory must not depend on who
    else is in the batch; ``only`` runs one request alone with the same seeds. Joiners' history
    rows are filled with ``joiner_history``.
    """
    gens = [torch.Generator().manual_seed(1000 + r) for r in range(len(requests))]
    latents = [
        torch.randn(rows, *LATENT, generator=g).to(device)
        for (_, _, rows), g in zip(requests, gens, strict=True)
    ]
    outputs = [
        torch.randn(n, rows, *LATENT, generator=g).to(device)
        for (n, _, rows), g in zip(requests, gens, strict=True)
    ]
    history = [torch.full_like(x, joiner_history) for x in latents]
    plans = [sampler.plan(n) for n, _, _ in requests]
    for tick in range(max(join + n for n, join, _ in requests)):
        active = [
            r for r, (n, join, _) in enumerate(requests) if join <= tick < join + n and only in (None, r)
        ]
        if not active:
            continue
        steps = [tick - requests[r][1] for r in active]
        sizes = [requests[r][2] for r in active]
        row_request = torch.cat([torch.full((size,), i) for i, size in enumerate(sizes)]).to(device)
        sample = torch.cat([latents[r] for r in active])
        active_plans = [plans[r] for r in active]
        assert sampler.scale_model_input(sample, active_plans, steps, row_request).shape == sample.shape
        out = torch.cat([outputs[r][k] for r, k in zip(active, steps, strict=True)])
        hist = torch.cat([history[r] for r in active]) if sampler.order == 2 else None
        new, new_hist = sampler.step(sample, out, hist, active_plans, steps, row_request)
        for r, chunk in zip(active, new.split(sizes), strict=True):
            latents[r] = chunk
        if new_hist is not None:
            for r, chunk in zip(active, new_hist.split(sizes), strict=True):
                history[r] = chunk
    return latents


MIXES = [
    [(20, 0, 3), (7, 2, 1), (25, 5, 2), (1, 6, 4), (3, 3, 2)],  # joins mid-way, several row counts
    [(2, 0, 1), (2, 1, 5), (5, 1, 2)],
]


def config_for(name: str) -> dict[str, Any]:
    return sd3_config() if name == "flow_euler" else sdxl_config()


def assert_batched_equals_solo(sampler: Sampler, requests: list[tuple[int, int, int]]) -> None:
    # NaN joiner history proves step 0 ignores history rather than multiplying it by zero.
    batched = simulate(sampler, requests, joiner_history=float("nan"))
    for r in range(len(requests)):
        solo = simulate(sampler, requests, joiner_history=0.0, only=r)[r]
        torch.testing.assert_close(batched[r], solo, rtol=0, atol=0)  # same ops per element: exact


@pytest.mark.parametrize("mix", range(len(MIXES)))
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_mixed_batch_equals_each_request_alone(name: str, mix: int) -> None:
    assert_batched_equals_solo(get_sampler(name, config_for(name)), MIXES[mix])


SAMPLERS = {name: get_sampler(name, config_for(name)) for name in SAMPLER_NAMES}


@settings(max_examples=25, deadline=None)
@given(
    name=st.sampled_from(SAMPLER_NAMES),
    requests=st.lists(
        st.tuples(st.integers(1, 6), st.integers(0, 4), st.integers(1, 3)), min_size=1, max_size=4
    ),
)
def test_any_mix_equals_each_request_alone(name: str, requests: list[tuple[int, int, int]]) -> None:
    assert_batched_equals_solo(SAMPLERS[name], requests)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", SAMPLER_NAMES)
def test_mixed_batch_on_cuda_matches_cpu(name: str) -> None:
    """Coefficients and row indices must follow the sample to its device."""
    sampler = SAMPLERS[name]
    on_cpu = simulate(sampler, MIXES[0], joiner_history=float("nan"))
    on_gpu = simulate(sampler, MIXES[0], joiner_history=float("nan"), device="cuda")
    for cpu, gpu in zip(on_cpu, on_gpu, strict=True):
        assert gpu.device.type == "cuda"
        assert_float32_close(gpu.cpu(), cpu)
