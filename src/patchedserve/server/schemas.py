"""HTTP schema of the OpenAI-compatible server: pydantic models, used only at the HTTP edge.

Owns the request and response bodies of ``POST /v1/images/generations`` and ``GET /v1/models`` and
the OpenAI error object. `server.app` parses requests with these and serialises responses from them;
everything past the edge uses the engine's dataclasses (`GenerationRequest`, `GenerationResult`).

Unknown fields are refused (``extra="forbid"``): the official clients send only the fields a caller
set, so an unknown one is almost always a typo of an extension field (``steps`` for
``num_inference_steps``) that would otherwise silently fall back to a default. OpenAI fields that
cannot change our output are accepted and ignored (``user``, ``safety_identifier``, ``moderation``),
as are the values of ``quality`` and ``background`` that ask for what we make anyway (``auto``,
``opaque``); other values we cannot honour are refused by value (``response_format="url"``,
``output_format="gif"``, ``quality="hd"``).
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from patchedserve.models.validation import MAX_PROMPT_CHARS, MAX_SEED

OutputFormat = Literal["png", "jpeg", "webp"]
OUTPUT_FORMATS: tuple[OutputFormat, ...] = ("png", "jpeg", "webp")
"""Image file formats a response can carry, as in the OpenAI API (PNG is lossless; JPEG and WebP
are several times smaller, at the quality ``output_compression`` sets)."""

MAX_IMAGES = 10
"""Most images one request may ask for (``n``), as in the OpenAI API."""

SIZE_PATTERN = re.compile(r"(\d{1,6})x(\d{1,6})", re.ASCII)
"""``WIDTHxHEIGHT`` in pixels, e.g. ``768x512`` (at most six digits a side: ``int`` refuses a
string of thousands of digits, and no model takes a side of a million pixels). ASCII digits only:
a Unicode digit class would also match other scripts' digits, which ``int`` reads."""


ANSWERED_AS_IS: dict[str, tuple[tuple[str, ...], str]] = {
    "moderation": (("auto", "low"), "this server runs no moderation"),
    "quality": (("auto",), "this server has one quality (num_inference_steps trades time for detail)"),
    "background": (("auto", "opaque"), "images are RGB, without transparency"),
}
"""OpenAI fields accepted at the values that describe what this server makes anyway."""


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)``, shortened to about ``limit`` characters: an error message quotes what was
    sent, not all of a 32,000-character prompt."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 20]}... ({len(text)} characters)"


class ImageGenerationRequest(BaseModel):
    """Body of ``POST /v1/images/generations``: the OpenAI fields plus diffusion extensions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    """Text to generate from; must not be blank."""
    model: str | None = None
    """The served model's name, or omitted."""
    n: int = Field(default=1, ge=1, le=MAX_IMAGES)
    """Images to generate; image ``i`` uses seed ``seed + i`` so they differ."""
    size: str | None = None
    """``WIDTHxHEIGHT`` in pixels, or ``auto``/omitted for the model's default."""
    response_format: str | None = None
    """Only ``b64_json`` (the default here); this server keeps no files to link to."""
    output_format: OutputFormat = "png"
    """``png``, ``jpeg`` or ``webp``."""
    output_compression: int | None = Field(default=None, ge=0, le=100)
    """JPEG or WebP quality, 0-100 (default 100: the least loss); not for PNG."""
    user: str | None = None
    """Accepted and ignored (an end-user identifier in the OpenAI API)."""
    safety_identifier: str | None = None
    """Accepted and ignored."""
    moderation: str | None = None
    """``auto`` or ``low``, accepted and ignored: this server moderates nothing."""
    quality: str | None = None
    """Only ``auto`` (the OpenAI default): this server has one quality; ``num_inference_steps``
    trades time for detail."""
    background: str | None = None
    """Only ``auto`` or ``opaque``: images are RGB, with no transparency."""
    negative_prompt: str = Field(default="", max_length=MAX_PROMPT_CHARS)
    """Extension: text to steer away from."""
    num_inference_steps: int | None = None
    """Extension: denoising steps; omitted means the model's default."""
    guidance_scale: float | None = None
    """Extension: classifier-free guidance scale; <= 1 turns guidance off."""
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    """Extension: seed of the first image's noise; image ``i`` uses ``seed + i``."""
    sampler: str | None = None
    """Extension: sampler name; omitted means the model's default."""
    slo_ms: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    """Extension: latency objective in milliseconds from arrival (positive, finite)."""

    @field_validator("prompt")
    @classmethod
    def _prompt_not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt must not be empty")
        return value

    @field_validator("size")
    @classmethod
    def _size_shape(cls, value: str | None) -> str | None:
        if value is not None and value != "auto" and SIZE_PATTERN.fullmatch(value) is None:
            raise ValueError(
                f"size must be WIDTHxHEIGHT in pixels (e.g. 512x512) or auto; got {shown(value)}"
            )
        return value

    @field_validator("moderation", "quality", "background")
    @classmethod
    def _what_we_make(cls, value: str | None, info: ValidationInfo) -> str | None:
        allowed, why = ANSWERED_AS_IS[str(info.field_name)]
        if value is not None and value not in allowed:
            choices = " or ".join(repr(a) for a in allowed)
            raise ValueError(f"{info.field_name} {shown(value)} is not supported: {why}; send {choices}")
        return value

    @field_validator("seed")
    @classmethod
    def _seeds_fit(cls, value: int, info: ValidationInfo) -> int:
        n = info.data.get("n", 1)  # n is declared before seed (absent if invalid)
        if value + n - 1 > MAX_SEED:
            raise ValueError(f"seed must be at most {MAX_SEED - n + 1} with n {n}, as image i uses seed + i")
        return value

    @field_validator("response_format")
    @classmethod
    def _only_b64(cls, value: str | None) -> str | None:
        if value not in (None, "b64_json"):
            raise ValueError(
                f"response_format {shown(value)} is not supported: this server returns images inline, "
                "only response_format='b64_json' is supported"
            )
        return value

    @field_validator("output_compression")
    @classmethod
    def _lossy_formats_only(cls, value: int | None, info: ValidationInfo) -> int | None:
        # output_format is declared before this field, so it was validated first (absent if invalid)
        if value is not None and info.data.get("output_format", "png") == "png":
            raise ValueError("output_compression applies to jpeg and webp only; PNG is lossless")
        return value

    def resolution(self) -> tuple[int | None, int | None]:
        """(width, height) in pixels; (None, None) for the model's default."""
        match = None if self.size is None else SIZE_PATTERN.fullmatch(self.size)
        if match is None:
            return None, None
        return int(match.group(1)), int(match.group(2))


class ImageData(BaseModel):
    """One generated image."""

    b64_json: str
    """The image file (``output_format``), base64-encoded."""
    revised_prompt: str | None = None
    """Always null: prompts are used as given."""


class ImageInfo(BaseModel):
    """Extension: how one image was made and how long each stage took."""

    request_id: int
    """The engine's id of this image's request."""
    width: int
    height: int
    steps: int
    guidance_scale: float
    sampler: str
    seed: int
    timings: dict[str, float | None]
    """Seconds from arrival until each stage: queue_s (admitted to the batch), encode_done_s (prompt
    encoded), first_step_s (first denoising step began), denoise_done_s, latency_s (image ready);
    None for a stage it did not reach."""
    deadline_met: bool | None
    """Whether the image finished before its deadline (null without one)."""


class GenerationInfo(BaseModel):
    """Extension block of an images response."""

    id: str
    """This generation's id (the ``X-Request-ID`` header when the client sent one)."""
    model: str
    images: list[ImageInfo]
    """One entry per image, in ``data`` order."""


class ImagesResponse(BaseModel):
    """Response of ``POST /v1/images/generations``."""

    created: int
    """Unix time in seconds."""
    data: list[ImageData]
    size: str
    """``WIDTHxHEIGHT`` of the images."""
    output_format: OutputFormat = "png"
    patchedserve: GenerationInfo


class ModelCard(BaseModel):
    """One entry of ``GET /v1/models``."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "patchedserve"


class ModelList(BaseModel):
    """Response of ``GET /v1/models``."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorObject(BaseModel):
    """The OpenAI error object."""

    message: str
    type: str
    param: str | None = None
    """The request field at fault, when one is."""
    code: str | None = None


class ErrorResponse(BaseModel):
    """Body of every error response."""

    error: ErrorObject
