"""The ``patchedserve`` command: a registry of subcommands and the one place errors become messages.

Each subcommand lives with the code it drives, in a module listed in `SUBCOMMANDS` that exposes
``add_parser(subparsers)``; the parser it adds sets ``handler``, a function ``(args) -> exit code``.
To add a subcommand (serve, bench, ...), write such a module and list it here.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
from pathlib import Path
from typing import NoReturn

# Library chatter (optional-dependency hints, deprecations) is noise on a command line.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Spinning OpenMP workers stall each other when the CPU is shared (measured 10x slower steps on a
# busy 2-core machine); passive waiting costs little when it is idle. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from patchedserve.errors import InvalidRequestError, PatchedServeError

SUBCOMMANDS: tuple[str, ...] = (
    "patchedserve.reference.commands",  # generate, run
    "patchedserve.models.commands",  # models
    "patchedserve.scheduler.commands",  # profile
    "patchedserve.bench.commands",  # bench step, burst, slo, calibrate, report
    "patchedserve.server.commands",  # serve
    "patchedserve.cluster.commands",  # simulate
)
"""Modules that each add one or more subcommands, in the order ``--help`` lists them."""

USAGE_ERROR = 2
"""Exit code of bad input, as argparse uses."""


def at_least_one(text: str) -> int:
    """An option's value that counts something: a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1; got {text!r}")
    return value


def positive_number(text: str) -> float:
    """An option's value that measures something: a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"must be a positive finite number; got {text!r}")
    return value


def check_output_paths(*paths: Path | None, folder: Path | None = None) -> None:
    """Refuses, before a command does its work, files it could not write at the end: a path that
    is a folder, or whose folder cannot be made or written. Makes the folders (``folder`` itself
    for a command that writes several files into one)."""
    files = [p for p in paths if p is not None]
    for path in files:
        if path.is_dir():
            raise InvalidRequestError(f"{path} is a folder; name a file to write", field="out")
    for target in [*(p.parent for p in files), *([] if folder is None else [folder])]:
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            message = f"cannot write under {target}: {err.strerror or err}"
            raise InvalidRequestError(message, field="out") from err
        if not os.access(target, os.W_OK):
            raise InvalidRequestError(f"cannot write under {target}: permission denied", field="out")


def add_streams_arg(parser: argparse.ArgumentParser) -> None:
    """The ``--streams`` option of the commands that time or run the denoiser (`streams`)."""
    parser.add_argument(
        "--streams",
        type=int,
        default=None,
        help="parts of each step denoised side by side, each on a share of the CPU threads "
        "(default: 2 on a CPU with >= 2 threads, else 1)",
    )


def apply_streams_arg(args: argparse.Namespace) -> None:
    """Make ``--streams`` the process default (None keeps the device rule)."""
    from patchedserve.streams import set_default_streams  # torch loads with the command, not the parser

    try:
        set_default_streams(args.streams)
    except ValueError as err:
        raise InvalidRequestError(str(err), field="streams") from err


class CommandParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one ``error: ...`` line, like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(
        prog="patchedserve",
        description="Mixed-resolution, SLO-aware serving of text-to-image diffusion models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module_name in SUBCOMMANDS:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs one subcommand; bad input (including a file that cannot be read) exits with code 2 and
    one ``error:`` line, never a traceback."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except PatchedServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except OSError as err:  # a file named on the command line is missing or unreadable, a port taken
        print(f"error: {err}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
