"""`load_model`: turns a built-in name or a local diffusers folder into a cached `ModelBundle`.

Called by the reference pipeline, the CLI and (later) the engine and server. Nothing here touches the
network: folders load with ``local_files_only=True``, and every failure becomes a one-sentence
`ModelLoadError`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from patchedserve.errors import ModelLoadError
from patchedserve.models.builtin import BUILTIN_MODELS
from patchedserve.models.bundle import Family, GenerationDefaults, ModelBundle
from patchedserve.models.quiet import quiet_hf

PIPELINE_FAMILIES: dict[str, Family | None] = {
    "StableDiffusionPipeline": None,  # sd15 or sd2, told apart by the U-Net's cross-attention width
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
}
"""model_index.json ``_class_name`` values we can load, and the family each one means."""

SCHEDULER_SAMPLERS: dict[str, str] = {
    "EulerDiscreteScheduler": "euler",
    "DDIMScheduler": "ddim",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
}
"""A folder's scheduler class and the sampler that reproduces it; others fall back to euler/flow_euler."""

_FAMILY_DEFAULTS: dict[Family, tuple[int, float]] = {
    "sd15": (50, 7.5),
    "sd2": (50, 7.5),
    "sdxl": (50, 5.0),
    "sd3": (28, 7.0),
}
"""Steps and guidance scale of the diffusers pipeline of each family."""


def load_model(name_or_path: str) -> ModelBundle:
    """The bundle for a built-in name (``tiny-sdxl``) or a local diffusers folder.

    Bundles are cached per name (folders per absolute path): every call with the same argument hands
    out the same object and modules, so a model is built or read from disk once per process. Their
    convolution weights are channels-last (``ModelBundle.channels_last``).

    Raises:
        ModelLoadError: unknown name, missing folder, missing or malformed model_index.json,
            unsupported pipeline class, or weights that diffusers cannot load.
    """
    if name_or_path in BUILTIN_MODELS:
        return _load_cached(name_or_path)
    path = Path(name_or_path).expanduser()
    if not path.exists():
        known = ", ".join(BUILTIN_MODELS)
        raise ModelLoadError(
            f"model {name_or_path!r} is neither a built-in model ({known}) nor an existing folder"
        )
    return _load_cached(str(path.resolve()))


def unload_models() -> None:
    """Forget every cached bundle (their memory goes once no caller holds them)."""
    _load_cached.cache_clear()


@functools.cache
def _load_cached(key: str) -> ModelBundle:
    bundle = BUILTIN_MODELS[key].build() if key in BUILTIN_MODELS else load_folder(Path(key))
    return bundle.channels_last()  # every cached bundle shares one layout, so runs repeat bit for bit


def read_model_index(folder: Path) -> dict[str, Any]:
    """The parsed model_index.json of a diffusers folder."""
    if not folder.is_dir():
        raise ModelLoadError(f"model path {folder} is not a folder; expected a diffusers model folder")
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ModelLoadError(
            f"model folder {folder} has no model_index.json, so it is not a diffusers folder"
        )
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ModelLoadError(f"model_index.json in {folder} is not valid JSON ({err})") from err
    if not isinstance(index, dict):
        raise ModelLoadError(f"model_index.json in {folder} must hold a JSON object")
    return index


def pipeline_class_name(index: dict[str, Any], folder: Path) -> str:
    """The pipeline class named in model_index.json, checked against the families we support."""
    class_name = index.get("_class_name")
    if class_name not in PIPELINE_FAMILIES:
        supported = ", ".join(PIPELINE_FAMILIES)
        raise ModelLoadError(
            f"model folder {folder} holds a {class_name!r} pipeline; supported pipelines are {supported}"
        )
    return str(class_name)


def load_folder(folder: Path) -> ModelBundle:
    """Reads a local diffusers folder into a bundle (float32, eval mode, on CPU)."""
    import diffusers

    index = read_model_index(folder)
    class_name = pipeline_class_name(index, folder)
    pipeline_class = getattr(diffusers, class_name)
    # Components saved as [null, null] (e.g. SD3 without T5) must be passed as None explicitly.
    extra: dict[str, Any] = {k: None for k, v in index.items() if v == [None, None]}
    if class_name == "StableDiffusionPipeline":
        extra.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    try:
        with quiet_hf():
            pipe = pipeline_class.from_pretrained(folder, local_files_only=True, **extra)
    except Exception as err:  # diffusers raises many types; all mean "this folder cannot be loaded"
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelLoadError(f"could not load the diffusers folder {folder}: {reason}") from err
    return _bundle_from_pipeline(pipe, folder)


def _bundle_from_pipeline(pipe: Any, folder: Path) -> ModelBundle:
    class_name = type(pipe).__name__
    family = PIPELINE_FAMILIES[class_name]
    if family is None:
        family = "sd2" if pipe.unet.config.cross_attention_dim == 1024 else "sd15"
    if family == "sd3":
        denoiser = pipe.transformer
        encoders = [pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]
    elif family == "sdxl":
        denoiser = pipe.unet
        encoders = [pipe.text_encoder, pipe.text_encoder_2]
        tokenizers = [pipe.tokenizer, pipe.tokenizer_2]
    else:
        denoiser = pipe.unet
        encoders = [pipe.text_encoder]
        tokenizers = [pipe.tokenizer]
    scheduler_class = type(pipe.scheduler).__name__
    scheduler_config = {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")}
    fallback = "flow_euler" if family == "sd3" else "euler"
    default_sampler = SCHEDULER_SAMPLERS.get(scheduler_class, fallback)
    if (default_sampler == "flow_euler") != (family == "sd3"):
        default_sampler = fallback
    steps, guidance = _FAMILY_DEFAULTS[family]
    vae_scale = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    side = int(denoiser.config.sample_size) * vae_scale
    bundle = ModelBundle(
        name=str(folder),
        family=family,
        denoiser=denoiser.float().eval().requires_grad_(False),
        vae=pipe.vae.float().eval().requires_grad_(False),
        text_encoders=[e.float().eval().requires_grad_(False) for e in encoders if e is not None],
        tokenizers=[t for t, e in zip(tokenizers, encoders, strict=True) if e is not None],
        scheduler_config={"_class_name": scheduler_class, **scheduler_config},
        default_sampler=default_sampler,
        defaults=GenerationDefaults(width=side, height=side, steps=steps, guidance_scale=guidance),
        force_zeros_for_empty_prompt=bool(pipe.config.get("force_zeros_for_empty_prompt", False)),
        extra={"folder": str(folder)},
    )
    if family == "sd3":
        # The transformer's position table covers pos_embed_max_size tokens per side.
        table_px = int(denoiser.config.pos_embed_max_size) * bundle.size_unit
        bundle.max_size = min(bundle.max_size, table_px)
    _round_defaults_to_unit(bundle)
    return bundle


def _round_defaults_to_unit(bundle: ModelBundle) -> None:
    unit = bundle.size_unit
    side = max(unit, min(bundle.defaults.width, bundle.max_size) // unit * unit)
    if side != bundle.defaults.width:
        d = bundle.defaults
        bundle.defaults = GenerationDefaults(side, side, d.steps, d.guidance_scale)
