"""The ``generate`` and ``run`` subcommands, on the reference pipeline. Registered by `patchedserve.cli`.

``generate`` makes one image; ``run`` makes three images at different resolutions with the default
model, without a server (``make images``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from patchedserve.errors import InvalidRequestError
from patchedserve.models.names import DEFAULT_MODEL

if TYPE_CHECKING:
    from patchedserve.reference.pipeline import ReferencePipeline, ReferenceResult

RUN_SIZES: tuple[tuple[int, int], ...] = ((512, 512), (768, 512), (512, 768))
"""(width, height) of the images ``patchedserve run`` makes."""
RUN_PROMPT = "a photo of a red cat on a city street at night, high quality"
"""Prompt of the images ``patchedserve run`` makes."""


def parse_size(text: str) -> tuple[int, int]:
    """``"768x512"`` -> (768, 512): width by height in pixels."""
    match = re.fullmatch(r"\s*(-?\d+)\s*[xX]\s*(-?\d+)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"--size must be WIDTHxHEIGHT in pixels, e.g. 768x512; got {text!r}")
    return int(match.group(1)), int(match.group(2))


def add_parser(subparsers: Any) -> None:
    gen = subparsers.add_parser("generate", help="generate one image", description="Generate one image.")
    gen.add_argument("--model", default=DEFAULT_MODEL, help="built-in name or diffusers folder")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--negative-prompt", default="")
    gen.add_argument("--size", type=parse_size, default=None, help="WIDTHxHEIGHT, e.g. 768x512")
    gen.add_argument("--steps", type=int, default=None)
    gen.add_argument("--guidance", type=float, default=None, help="guidance scale; <= 1 turns CFG off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--sampler", default=None, help="euler, ddim, dpmpp_2m or flow_euler")
    gen.add_argument("--out", type=Path, default=None, help="PNG path (default: outputs/...)")
    gen.set_defaults(handler=run_generate)

    run = subparsers.add_parser(
        "run",
        help="three images at different resolutions into ./outputs/, no server",
        description="Generate three images (512x512, 768x512, 512x768) with the default model.",
    )
    run.add_argument("--model", default=DEFAULT_MODEL)
    run.add_argument("--out-dir", type=Path, default=Path("outputs"))
    run.add_argument("--steps", type=int, default=None, help="denoising steps (default: the model's)")
    run.set_defaults(handler=run_main_job)


def load_pipeline(model: str) -> ReferencePipeline:
    """The reference pipeline of ``model``; torch and diffusers load here, not with the parser."""
    from patchedserve.models import load_model
    from patchedserve.reference.pipeline import ReferencePipeline

    return ReferencePipeline.from_model(load_model(model))


def run_generate(args: argparse.Namespace) -> int:
    if args.out is not None:
        check_image_path(args.out)  # before the model loads and the image is made
    pipeline = load_pipeline(args.model)
    width, height = args.size if args.size is not None else (None, None)
    result = pipeline.generate(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        width=width,
        height=height,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        sampler=args.sampler,
        progress=sys.stderr.isatty(),
    )
    out = args.out if args.out is not None else _default_path(Path("outputs"), pipeline, result)
    _save(result, out)
    _report(pipeline, result, out)
    return 0


def run_main_job(args: argparse.Namespace) -> int:
    pipeline = load_pipeline(args.model)
    print(f"generating {len(RUN_SIZES)} images with {pipeline.bundle.name}: {RUN_PROMPT!r}")
    for width, height in RUN_SIZES:
        result = pipeline.generate(
            prompt=RUN_PROMPT, width=width, height=height, steps=args.steps, progress=sys.stderr.isatty()
        )
        out = _default_path(args.out_dir, pipeline, result)
        _save(result, out)
        _report(pipeline, result, out)
    print(f"done: {len(RUN_SIZES)} images in {args.out_dir.resolve()}")
    return 0


def check_image_path(out: Path) -> None:
    """Refuses a path whose extension no image format is written under, or that could not be
    written (``cli.check_output_paths``), so that a bad ``--out`` costs no generation."""
    import PIL.Image

    from patchedserve.cli import check_output_paths

    kind = PIL.Image.registered_extensions().get(out.suffix.lower())
    if not out.is_dir() and (kind is None or kind not in PIL.Image.SAVE):
        raise InvalidRequestError(
            f"--out {out}: no image format is written as {out.suffix or 'a file without an extension'}; "
            "use .png, .jpg or .webp",
            field="out",
        )
    check_output_paths(out)


def _default_path(folder: Path, pipeline: ReferencePipeline, result: ReferenceResult) -> Path:
    p = result.params
    model = Path(pipeline.bundle.name).name
    return folder / f"{model}-{p.width}x{p.height}-seed{p.seed}.png"


def _save(result: ReferenceResult, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)


def _report(pipeline: ReferencePipeline, result: ReferenceResult, out: Path) -> None:
    p, t = result.params, result.timings
    print(
        f"wrote {out} ({p.width}x{p.height}, {pipeline.bundle.name}, {p.steps} steps {p.sampler},"
        f" guidance {p.guidance_scale:g}, seed {p.seed})"
    )
    print(
        f"  timings: encode {t['encode_s']:.3f} s, denoise {t['denoise_s']:.3f} s"
        f" ({t['denoise_s'] / p.steps:.3f} s/step), decode {t['decode_s']:.3f} s, total {t['total_s']:.3f} s"
    )
