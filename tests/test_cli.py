"""The ``patchedserve`` command: one generate and every bad input run as a user runs them, in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from patchedserve.cli import build_parser, main
from patchedserve.errors import InvalidRequestError

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest: one thread is faster for tiny models


def start(args: list[str], cwd: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "patchedserve.cli", *args]
    return subprocess.Popen(
        command, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    """Waits for ``proc``; kills it rather than leave it running when it takes too long."""
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, out, err


def run(args: list[str], cwd: Path) -> tuple[int, str, str]:
    return finish(start(args, cwd))


def test_generate_writes_the_image_and_reports_timings(tmp_path: Path) -> None:
    args = ["generate", "--model", "tiny-sd3", "--prompt", "a cat", "--size", "64x48", "--steps", "2"]
    code, out, err = run([*args, "--out", "img/out.png"], tmp_path)
    assert code == 0, err
    assert Image.open(tmp_path / "img" / "out.png").size == (64, 48)
    assert "wrote img/out.png" in out and "timings:" in out and "denoise" in out
    assert "Traceback" not in err and "denoise:" not in err  # no progress bar without a terminal


def test_run_writes_three_resolutions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # In-process (same code path as the console script) to save a second interpreter start.
    assert main(["run", "--steps", "1", "--out-dir", str(tmp_path / "imgs")]) == 0
    sizes = sorted(Image.open(p).size for p in (tmp_path / "imgs").glob("*.png"))
    assert sizes == [(512, 512), (512, 768), (768, 512)]
    assert "done: 3 images in" in capsys.readouterr().out


def test_models_lists_the_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in ("tiny-sd15", "tiny-sdxl", "tiny-sd3")) and "(default)" in out
    assert "sdxl-arch   sdxl   1024x1024    50" in out  # listed from a meta-device build, not 14 GB


BAD_INPUTS: dict[str, tuple[list[str], str]] = {
    "size-not-multiple": (["--size", "500x512"], "width must be a multiple of 32"),
    "size-non-positive": (["--size", "512x0"], "height must be a multiple of 32"),
    "size-above-max": (["--size", "4096x512"], "to 2048"),
    "size-malformed": (["--size", "big"], "--size must be WIDTHxHEIGHT"),
    "unknown-model": (["--model", "tiny-nothing"], "neither a built-in model"),
    "missing-folder": (["--model", "no/such/folder"], "neither a built-in model"),
    "malformed-folder": (["--model", "broken"], "not valid JSON"),
    "steps-out-of-range": (["--steps", "0"], "steps must be from 1 to 500"),
    "guidance-out-of-range": (["--guidance", "99"], "guidance_scale must be from 0 to 50"),
}


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, str]]:
    """Runs every bad-input case at once: each one only imports and fails, so they overlap well."""
    cwd = tmp_path_factory.mktemp("cli")
    (cwd / "broken").mkdir()
    (cwd / "broken" / "model_index.json").write_text("{oops")
    procs = {
        case: start(["generate", "--prompt", "a cat", *args, "--out", "never.png"], cwd)
        for case, (args, _) in BAD_INPUTS.items()
    }
    try:
        results = {case: finish(proc) for case, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert not (cwd / "never.png").exists()
    return results


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_exit_code_2(
    case: str, bad_input_results: dict[str, tuple[int, str, str]]
) -> None:
    code, out, err = bad_input_results[case]
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert BAD_INPUTS[case][1] in err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "report", "missing.json"], "No such file or directory: 'missing.json'"),
        (["bench", "report", "text.json"], "text.json is not a results.json of bench slo or simulate"),
        (["bench", "report", "other.json"], "other.json is not a results.json of bench slo or simulate"),
        (["simulate", "--compare", "other.json", "--out", "sim"], "other.json is not a results.json"),
    ],
)
def test_a_file_that_is_missing_or_of_another_kind_is_one_error_line(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "text.json").write_text("not json\n")
    (tmp_path / "other.json").write_text('{"format": "something else"}\n')
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "sim").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["simulate", "--qps", "nan"], "positive finite numbers"),
        (["simulate", "--qps", "1,inf"], "positive finite numbers"),
        (["simulate", "--replicas", "0.5"], "whole numbers"),
        (["simulate", "--speed-bucket", "0"], "positive finite number"),
        (["simulate", "--patch-size", "0"], "whole number >= 1"),
        (["profile", "--threads", "0"], "whole number >= 1"),
        (["bench", "calibrate", "--threads", "-1"], "whole number >= 1"),
        (["bench", "burst", "--count", "-2"], "whole number >= 1"),
        (["bench", "step", "--repeats", "0"], "whole number >= 1"),
        (["profile", "--repeats", "0"], "whole number >= 1"),
        (["serve", "--port", "70000"], "port from 0 to 65535"),
        (["serve", "--log-level", "bogus"], "invalid choice"),
    ],
)
def test_a_flag_out_of_range_is_a_usage_error(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument" in err and message in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["generate", "--prompt", "a", "--out", "cat.xyz"], "no image format is written as .xyz"),
        (["generate", "--prompt", "a", "--out", "folder"], "is a folder"),
        (["profile", "--out", "plain.txt/p.json"], "cannot write under plain.txt"),
        (["bench", "step", "--json", "folder"], "is a folder"),
        (["bench", "calibrate", "--out", "plain.txt/costs"], "cannot write under plain.txt"),
        (["profile", "--out", "p.json", "--device", "bogus"], "is not a torch device"),
        (["bench", "calibrate", "--out", "costs", "--device", "cuda:99"], "is not available here"),
        (["bench", "step", "--device", "bogus"], "is not a torch device"),
        (["bench", "slo", "--out", "slo", "--device", "bogus"], "is not a torch device"),
    ],
)
def test_an_output_or_device_this_machine_lacks_is_refused_before_any_work(
    args: list[str],
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import patchedserve.models as models

    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "plain.txt").write_text("a file, not a folder\n")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the work began"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_serve_flags_reach_the_engine_config() -> None:
    from patchedserve.cli import build_parser
    from patchedserve.server.commands import engine_config

    args = build_parser().parse_args(["serve", "--policy", "slo", "--patch-cache", "0.1"])
    config = engine_config(args)
    assert config.policy == "slo"
    assert config.patch_cache is not None and config.patch_cache.threshold == 0.1
    assert engine_config(build_parser().parse_args(["serve"])).patch_cache is None
    assert engine_config(build_parser().parse_args(["serve"])).reserve is True
    assert engine_config(build_parser().parse_args(["serve", "--reserve", "off"])).reserve is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--reserve", "maybe"])
    with pytest.raises(InvalidRequestError) as err:  # main prints it as one error line, exit code 2
        engine_config(build_parser().parse_args(["serve", "--device", "gpu"]))
    assert err.value.field == "device"
    # The policy's knobs are checked when the engine config is made, before any model loads.
    for flag, value in (("--policy", "lifo"), ("--inline-decode", "-1"), ("--slo-scale", "0")):
        with pytest.raises(InvalidRequestError) as err:
            engine_config(build_parser().parse_args(["serve", flag, value]))
        assert err.value.field == flag[2:].replace("-", "_")


def test_serve_help_shows_the_engine_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    from patchedserve.engine import EngineConfig

    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    defaults = EngineConfig()
    for flag, shown in (
        ("--patch-size PATCH_SIZE", str(defaults.patch_size)),
        ("--policy POLICY", defaults.policy),
        ("--max-waiting MAX_WAITING", str(defaults.max_waiting)),
        ("--reserve RESERVE", "on" if defaults.reserve else "off"),
    ):
        after = text.split(flag, 2)[2]  # the option's entry, after the usage line's mention
        assert after.split(" --", 1)[0].endswith(f"(default: {shown})"), after[:200]


def test_the_parser_loads_neither_the_model_stack_nor_the_http_stack() -> None:
    """``--help`` and usage errors answer without torch, diffusers or transformers (seconds to
    import), and the commands other than serve run where fastapi and uvicorn are not installed."""
    heavy = ("fastapi", "uvicorn", "starlette", "torch", "diffusers", "transformers", "ray")
    code = (
        "import sys; from patchedserve.cli import build_parser; build_parser(); "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
