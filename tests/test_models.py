"""Built-in models, folder loading, prompt encoding and request validation (against diffusers)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection

from patchedserve.errors import InvalidRequestError, ModelLoadError
from patchedserve.models import (
    BUILTIN_MODELS,
    ModelBundle,
    decode_latents,
    denoiser_forward,
    encode_prompts,
    load_model,
    sdxl_time_ids,
    stack_conditioning,
    validate_generation,
)

BUILTIN_NAMES = ("tiny-sd15", "tiny-sdxl", "tiny-sd3")


def random_inputs(bundle: ModelBundle, batch: int = 2, side: int = 8) -> dict[str, torch.Tensor | None]:
    """Seeded denoiser inputs of the right shapes for the bundle's family."""
    g = torch.Generator().manual_seed(0)
    conds = encode_prompts(bundle, ["a cat", "a dog"][:batch])
    embeds, pooled = stack_conditioning(conds)
    time_ids = None
    if bundle.family == "sdxl":
        time_ids = torch.stack([sdxl_time_ids(bundle, 64, 64)] * batch)
    return {
        "sample": torch.randn(batch, bundle.latent_channels, side, side, generator=g),
        "timestep": torch.tensor([999.0, 400.0][:batch]),
        "prompt_embeds": embeds,
        "pooled": pooled,
        "time_ids": time_ids,
    }


def test_builtin_layouts_follow_their_family() -> None:
    sd15, sdxl, sd3 = (load_model(n) for n in BUILTIN_NAMES)
    assert (sd15.family, sdxl.family, sd3.family) == ("sd15", "sdxl", "sd3")
    assert isinstance(sd15.denoiser, UNet2DConditionModel) and isinstance(sdxl.denoiser, UNet2DConditionModel)
    assert isinstance(sd3.denoiser, SD3Transformer2DModel)
    assert sd15.denoiser.config.down_block_types[0] == "CrossAttnDownBlock2D"
    assert sd15.denoiser.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert sdxl.denoiser.config.down_block_types[:2] == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert sdxl.denoiser.config.addition_embed_type == "text_time"
    assert [type(e) for e in sdxl.text_encoders] == [CLIPTextModel, CLIPTextModelWithProjection]
    assert [type(e) for e in sd3.text_encoders] == [CLIPTextModelWithProjection] * 2
    assert all(isinstance(b.vae, AutoencoderKL) for b in (sd15, sdxl, sd3))
    assert [b.latent_channels for b in (sd15, sdxl, sd3)] == [4, 4, 16]
    assert [b.size_unit for b in (sd15, sdxl, sd3)] == [32, 32, 16]
    assert [b.default_sampler for b in (sd15, sdxl, sd3)] == ["ddim", "euler", "flow_euler"]
    assert all(b.vae_scale_factor == 8 and b.max_size == 2048 for b in (sd15, sdxl, sd3))
    assert all((b.defaults.width, b.defaults.height) == (512, 512) for b in (sd15, sdxl, sd3))
    assert sdxl.force_zeros_for_empty_prompt and not sd15.force_zeros_for_empty_prompt


def test_builtins_are_cached_and_identical_on_every_build() -> None:
    assert load_model("tiny-sdxl") is load_model("tiny-sdxl")
    for name in BUILTIN_NAMES:
        cached, fresh = load_model(name), BUILTIN_MODELS[name].build()
        modules = [(cached.denoiser, fresh.denoiser), (cached.vae, fresh.vae)]
        modules += list(zip(cached.text_encoders, fresh.text_encoders, strict=True))
        for a, b in modules:
            for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
                assert torch.equal(x, y), f"{name}: {key} differs between builds"


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_encode_prompts_equals_diffusers_encode_prompt(name: str) -> None:
    bundle = load_model(name)
    pipe = bundle.diffusers_pipeline(bundle.default_scheduler())
    prompts = ["a photo of a red cat", ""]
    positives = encode_prompts(bundle, prompts)
    negatives = encode_prompts(bundle, ["", "blurry"], negative=True)
    for prompt, pos, neg_text, neg in zip(prompts, positives, ["", "blurry"], negatives, strict=True):
        kwargs = {"do_classifier_free_guidance": True, "negative_prompt": neg_text or None}
        if bundle.family == "sd15":
            want = pipe.encode_prompt(prompt, "cpu", 1, **kwargs)
            want_pooled: tuple[torch.Tensor | None, ...] = (None, None)
        elif bundle.family == "sdxl":
            *want, p, np_ = pipe.encode_prompt(prompt, **kwargs)
            want_pooled = (p, np_)
        else:
            *want, p, np_ = pipe.encode_prompt(prompt, None, None, **kwargs)
            want_pooled = (p, np_)
        for got, expected, expected_pooled in (
            (pos, want[0], want_pooled[0]),
            (neg, want[1], want_pooled[1]),
        ):
            torch.testing.assert_close(got.prompt_embeds, expected[0], rtol=0, atol=1e-6)
            if expected_pooled is None:
                assert got.pooled is None
            else:
                torch.testing.assert_close(got.pooled, expected_pooled[0], rtol=0, atol=1e-6)
    if bundle.family == "sdxl":  # force_zeros_for_empty_prompt: only an empty *negative* is zero
        assert negatives[0].prompt_embeds.abs().max() == 0 and positives[1].prompt_embeds.abs().max() > 0


def test_sd3_prompt_is_clip_then_t5_zeros() -> None:
    bundle = load_model("tiny-sd3")
    (cond,) = encode_prompts(bundle, ["a cat"])
    assert cond.prompt_embeds.shape == (77 + 256, 128) and cond.pooled is not None
    assert cond.pooled.shape == (96,)
    assert cond.prompt_embeds[77:].abs().max() == 0 and cond.prompt_embeds[:77, 96:].abs().max() == 0


def test_sd3_with_t5_equals_diffusers_encode_prompt() -> None:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    letters = "abcdefghijklmnopqrstuvwxyz"
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -0.5)]
    pieces += [(c, -1.0) for c in letters] + [("\u2581" + c, -1.5) for c in letters]
    tokenizer = T5Tokenizer(vocab=pieces, extra_ids=0)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=128, d_ff=64, d_kv=16, num_layers=1, num_heads=2)
    t5 = T5EncoderModel(config).eval()
    base = load_model("tiny-sd3")
    bundle = dataclasses.replace(
        base, text_encoders=[*base.text_encoders, t5], tokenizers=[*base.tokenizers, tokenizer]
    )
    pipe = bundle.diffusers_pipeline(bundle.default_scheduler())
    want, want_neg, want_pooled, _ = pipe.encode_prompt("a cat", None, None, negative_prompt=None)
    got, neg = encode_prompts(bundle, ["a cat", ""], negative=[False, True])
    # Batch of 2 vs diffusers' batches of 1: T5's matmuls may round differently in the last bits.
    torch.testing.assert_close(got.prompt_embeds, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(neg.prompt_embeds, want_neg[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.pooled, want_pooled[0], rtol=1e-5, atol=1e-5)
    assert got.prompt_embeds[77:].abs().max() > 0  # the T5 part is real, not zeros


def test_sdxl_time_ids_are_size_crop_size() -> None:
    assert sdxl_time_ids(load_model("tiny-sdxl"), 768, 512).tolist() == [768, 512, 0, 0, 768, 512]


def test_decode_latents_gives_one_image_per_row() -> None:
    bundle = load_model("tiny-sd3")
    images = decode_latents(bundle, torch.randn(2, 16, 6, 4, generator=torch.Generator().manual_seed(0)))
    assert [im.size for im in images] == [(32, 48), (32, 48)] and images[0].mode == "RGB"


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_saved_folder_loads_back_identical(name: str, saved_model: Callable[[str], Path]) -> None:
    original = load_model(name)
    folder = saved_model(name)
    assert json.loads((folder / "model_index.json").read_text())["_class_name"].startswith("StableDiffusion")
    loaded = load_model(str(folder))
    assert loaded is load_model(str(folder)) and loaded is not original
    assert (loaded.family, loaded.default_sampler, loaded.size_unit) == (
        original.family,
        original.default_sampler,
        original.size_unit,
    )
    assert loaded.scheduler_config == original.scheduler_config
    assert loaded.force_zeros_for_empty_prompt == original.force_zeros_for_empty_prompt
    with torch.inference_mode():
        want = denoiser_forward(original, **random_inputs(original))
        got = denoiser_forward(loaded, **random_inputs(loaded))
    assert torch.equal(got, want)


@pytest.mark.parametrize("name", BUILTIN_NAMES)
def test_loaded_bundles_lay_conv_weights_out_channels_last(
    name: str, saved_model: Callable[[str], Path]
) -> None:
    fresh = BUILTIN_MODELS[name].build()  # what load_model builds, before the layout change
    for bundle in (load_model(name), load_model(str(saved_model(name)))):
        convs = [p for m in (bundle.denoiser, bundle.vae) for p in m.parameters() if p.dim() == 4]
        assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
        assert not all(p.is_contiguous() for p in convs)  # really moved, not 1x1 kernels only
    cached = load_model(name)
    for ours, theirs in zip(
        cached.denoiser.state_dict().values(), fresh.denoiser.state_dict().values(), strict=True
    ):
        assert torch.equal(ours, theirs)  # the same values, laid out differently
    with torch.inference_mode():
        want = denoiser_forward(fresh, **random_inputs(fresh))
        got = denoiser_forward(cached, **random_inputs(cached))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # float rounding of another layout


def test_sd2_is_told_from_sd15_by_cross_attention_width(tmp_path: Path) -> None:
    from patchedserve.models.loading import _bundle_from_pipeline

    pipe = load_model("tiny-sd15").diffusers_pipeline(load_model("tiny-sd15").default_scheduler())
    wide = UNet2DConditionModel.from_config({**pipe.unet.config, "cross_attention_dim": 1024})
    pipe.unet = wide
    assert _bundle_from_pipeline(pipe, tmp_path).family == "sd2"


def write(folder: Path, index: str | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if index is not None:
        (folder / "model_index.json").write_text(index)
    return folder


@pytest.mark.parametrize(
    ("make", "phrase"),
    [
        (lambda p: "tiny-nothing", "neither a built-in model"),
        (lambda p: str(p / "missing"), "neither a built-in model"),
        (lambda p: str(write(p / "empty", None)), "no model_index.json"),
        (lambda p: str(write(p / "bad", "{not json")), "not valid JSON"),
        (lambda p: str(write(p / "list", "[1, 2]")), "JSON object"),
        (lambda p: str(write(p / "flux", '{"_class_name": "FluxPipeline"}')), "supported pipelines are"),
        (lambda p: str(write(p / "hollow", '{"_class_name": "StableDiffusionPipeline"}')), "could not load"),
    ],
)
def test_load_errors_are_one_clear_sentence(make: Callable[[Path], str], phrase: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as info:
        load_model(make(tmp_path))
    assert phrase in str(info.value) and "\n" not in str(info.value)


def test_validate_generation_fills_defaults() -> None:
    bundle = load_model("tiny-sdxl")
    params = validate_generation(bundle)
    assert (params.width, params.height, params.steps, params.sampler) == (512, 512, 20, "euler")
    assert params.guidance_scale == 5.0 and params.do_cfg
    assert not validate_generation(bundle, guidance_scale=1.0).do_cfg


@pytest.mark.parametrize(
    ("kwargs", "field", "phrase"),
    [
        ({"width": 500}, "width", "multiple of 32"),
        ({"height": 0}, "height", "multiple of 32"),
        ({"width": -64}, "width", "multiple of 32"),
        ({"height": 2080}, "height", "to 2048"),
        ({"width": 512.0}, "width", "integer"),
        ({"steps": 0}, "steps", "from 1 to 500"),
        ({"steps": 501}, "steps", "from 1 to 500"),
        ({"guidance_scale": -1.0}, "guidance_scale", "from 0 to 50"),
        ({"guidance_scale": float("nan")}, "guidance_scale", "from 0 to 50"),
        ({"sampler": "flow_euler"}, "sampler", "euler, ddim, dpmpp_2m"),
        ({"sampler": "plms"}, "sampler", "one of"),
        ({"seed": -1}, "seed", "from 0"),
    ],
)
def test_validate_generation_rejects(kwargs: dict[str, object], field: str, phrase: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_generation(load_model("tiny-sdxl"), **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field and phrase in str(info.value)


def test_max_size_is_per_bundle() -> None:
    small = dataclasses.replace(load_model("tiny-sd3"), max_size=256)
    assert small.denoiser is load_model("tiny-sd3").denoiser
    with pytest.raises(InvalidRequestError, match="from 16 to 256"):
        validate_generation(small, width=272)


def _meta_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(
    ("name", "denoiser_params"),
    [("sdxl-arch", 2_567_463_684), ("sd3-arch", 2_028_328_000)],
)
def test_fullsize_builtins_have_the_published_sizes(name: str, denoiser_params: int) -> None:
    """Built on the meta device (shapes only): SDXL base's U-Net is 2.567B parameters, SD3 medium's
    MMDiT 2.028B, and both VAEs the 83.7M-parameter 8x KL autoencoder of the released models."""
    with torch.device("meta"):
        bundle = BUILTIN_MODELS[name].build()
    assert _meta_params(bundle.denoiser) == denoiser_params
    assert 83_600_000 < _meta_params(bundle.vae) < 83_900_000
    widths = [e.config.hidden_size for e in bundle.text_encoders]
    depths = [e.config.num_hidden_layers for e in bundle.text_encoders]
    assert (widths, depths) == ([768, 1280], [12, 32])
    assert (bundle.defaults.width, bundle.defaults.height, bundle.vae_scale_factor) == (1024, 1024, 8)
