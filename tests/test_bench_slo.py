"""SLO benchmark figures on hand-made outcomes, and one tiny real replay through ``bench slo``.

The replay uses tiny-sdxl at 64x64, 2 steps, patch 64, three requests, a synthetic profile and
image-level cost file (so nothing is measured but the replay itself), then ``simulate --compare``
on its results.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from patchedserve.bench.metrics import RequestOutcome, goodput_at_target, qps_at_satisfaction, summarize
from patchedserve.bench.results import load_step_progress, load_steps, run_file
from patchedserve.bench.traces import TraceRequest, save_trace
from patchedserve.cli import main
from patchedserve.scheduler import LatencyPredictor, Overhead

RUN_KEYS = {
    "system",
    "qps",
    "slo_scale",
    "slo_satisfaction",
    "goodput_rps",
    "p50_s",
    "p90_s",
    "p99_s",
    "drop_rate",
    "per_resolution",
}


def outcome(
    i: int, status: str, latency_s: float | None, slo_s: float = 10.0, size: str = "64x64"
) -> RequestOutcome:
    return RequestOutcome(i, size, float(i), status, latency_s, slo_s)


def test_satisfaction_goodput_and_percentiles_by_hand() -> None:
    outcomes = [
        outcome(0, "finished", 1.0),
        outcome(1, "finished", 2.0),
        outcome(2, "finished", 3.0),
        outcome(3, "finished", 12.0),  # finished but late
        outcome(4, "dropped", None),
        outcome(5, "rejected", None),
        outcome(6, "cancelled", None),
        outcome(7, "finished", 10.0),  # exactly on the deadline counts
    ]
    s = summarize(outcomes, duration_s=20.0)
    assert s["requests"] == 8 and s["finished"] == 5 and s["met"] == 4
    assert s["slo_satisfaction"] == pytest.approx(4 / 8)
    assert s["goodput_rps"] == pytest.approx(4 / 20)
    assert s["drop_rate"] == pytest.approx(2 / 8)
    assert s["unfinished_rate"] == pytest.approx(1 / 8)
    assert s["p50_s"] == pytest.approx(3.0)  # of 1, 2, 3, 10, 12
    assert s["p90_s"] == pytest.approx(10.0 + 0.6 * 2.0)
    assert s["p99_s"] == pytest.approx(10.0 + 0.96 * 2.0)
    empty = summarize([outcome(0, "dropped", None)], 1.0)
    assert empty["p50_s"] is None and empty["slo_satisfaction"] == 0.0


def test_the_decode_phase_is_the_median_time_from_denoised_to_image_ready() -> None:
    outcomes = [
        RequestOutcome(0, "64x64", 0.0, "finished", 2.0, 10.0, denoised_s=1.5),
        RequestOutcome(1, "64x64", 1.0, "finished", 4.0, 10.0, denoised_s=3.0),
        RequestOutcome(2, "64x64", 2.0, "finished", 6.0, 10.0, denoised_s=3.0),
        RequestOutcome(3, "64x64", 3.0, "dropped", None, 10.0),
        RequestOutcome(4, "64x64", 4.0, "finished", 1.0, 10.0),  # no denoising time: not counted
    ]
    assert summarize(outcomes, 10.0)["decode_p50_s"] == pytest.approx(1.0)  # of 0.5, 1 and 3
    assert summarize(outcomes[3:], 10.0)["decode_p50_s"] is None


def test_qps_at_90_percent_interpolates_the_crossing() -> None:
    assert qps_at_satisfaction([(0.5, 1.0), (1.0, 0.95), (1.5, 0.75)]) == {
        "qps": pytest.approx(1.125),
        "bound": "exact",
    }
    assert qps_at_satisfaction([(0.5, 1.0), (1.0, 0.92)]) == {"qps": 1.0, "bound": "at_least"}
    assert qps_at_satisfaction([(0.5, 0.8), (1.0, 0.5)]) == {"qps": None, "bound": "below_sweep"}
    runs = [
        {"system": s, "qps": q, "slo_scale": 5.0, "slo_satisfaction": v}
        for s, pts in {
            "patchedserve": [(1.0, 1.0), (2.0, 0.8)],
            "image-fcfs": [(1.0, 0.95), (2.0, 0.5)],
        }.items()
        for q, v in pts
    ]
    table = goodput_at_target(runs)["systems"]
    assert table["patchedserve@5x"]["qps"] == pytest.approx(1.5)
    assert table["image-fcfs@5x"]["qps"] == pytest.approx(1.0 + 0.05 / 0.45)
    assert table["image-fcfs@5x"]["ratio"] == pytest.approx(1.5 / (1.0 + 0.05 / 0.45))


def test_runs_at_two_slo_scales_keep_their_own_outcomes_and_steps(tmp_path: Path) -> None:
    from patchedserve.bench.metrics import RequestOutcome
    from patchedserve.bench.results import find_run_file, load_outcomes, save_outcomes, save_steps

    for scale, status in ((3.0, "dropped"), (10.0, "finished")):
        run = {"system": "nirvana", "replicas": 1, "qps": 1.0, "slo_scale": scale}
        save_outcomes(tmp_path, run, [RequestOutcome(0, "64x64", 0.0, status, 1.0, 2.0)])
        save_steps(tmp_path, run, [(0.0, 0.1 * scale, [(64, 64, True)])])
    for scale, status in ((3.0, "dropped"), (10.0, "finished")):
        [outcome] = load_outcomes(find_run_file(tmp_path, "outcomes", "nirvana", 1, 1.0, scale))
        [(_, latency_s, _)] = load_steps(find_run_file(tmp_path, "steps", "nirvana", 1, 1.0, scale))
        assert outcome.status == status and latency_s == pytest.approx(0.1 * scale)
    # A folder written before session 26 named no scale: its one file per load is found for any.
    legacy = tmp_path / "old" / "outcomes" / "nirvana_1r_1qps.jsonl"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("")
    assert find_run_file(tmp_path / "old", "outcomes", "nirvana", 1, 1.0, 5.0) == legacy


def write_profile(path: Path) -> Path:
    """A rough synthetic profile of tiny-sdxl at patch 64 (deadlines only need to be generous)."""
    coef = (0.005, 0.002, 0.0001, 0.001, 0.0005, 0.0005, 0.001, 0.001)
    return LatencyPredictor(coef=coef, patch_size=64, overhead=Overhead(0.01, 0.01, 1.0)).save(path)


def test_tiny_real_replay_writes_results_and_plots(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    trace = [
        TraceRequest(0.0, "a red fox", 64, 64, 2, 5.0, 1, 200.0),
        TraceRequest(0.05, "a red fox", 64, 64, 2, 5.0, 2, 200.0),
        TraceRequest(0.1, "a bowl of ramen", 128, 64, 2, 5.0, 3, 200.0),
    ]
    trace_path = save_trace(tmp_path / "trace.jsonl", trace)
    profile = write_profile(tmp_path / "profile.json")
    out = tmp_path / "run"
    args = [
        "bench",
        "slo",
        "--model",
        "tiny-sdxl",
        "--trace",
        str(trace_path),
        "--patch-size",
        "64",
        "--profile",
        str(profile),
        "--image-cost",
        str(profile),
        "--patched-cost",
        str(profile),
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    data = json.loads((out / "results.json").read_text())
    assert [r["system"] for r in data["runs"]] == [
        "image-fcfs",
        "res-batch",
        "nirvana",
        "patched-fcfs",
        "patchedserve",
        "patchedserve-cache",
    ]
    for run in data["runs"]:
        assert set(run) >= RUN_KEYS
        assert run["requests"] == 3 and run["slo_satisfaction"] == 1.0
        assert set(run["per_resolution"]) == {"64x64", "128x64"}
    for name in ("slo_vs_qps.png", "goodput_vs_qps.png", "latency_cdf.png"):
        assert (out / name).stat().st_size > 1000
    outcome_files = list((out / "outcomes").glob("*.jsonl"))
    assert len(outcome_files) == 6
    for path in outcome_files:  # every request finished: denoised before its image was ready
        for row in map(json.loads, path.read_text().splitlines()):
            assert 0.0 < row["denoised_s"] < row["latency_s"]
    steps = load_steps(
        run_file(out, "steps", "patched-fcfs", 1, data["runs"][3]["qps"], data["runs"][3]["slo_scale"])
    )
    assert sum(len(entries) for _, _, entries in steps) == 2 + 2 + 2  # every request ran its 2 steps
    progress = load_step_progress(
        run_file(out, "steps", "patched-fcfs", 1, data["runs"][3]["qps"], data["runs"][3]["slo_scale"])
    )
    assert progress is not None and len(progress) == len(steps)
    taken: dict[int, list[int]] = {}
    for step in progress:
        for request_id, step_index in step:
            taken.setdefault(request_id, []).append(step_index)
    assert sorted(taken.values()) == [[0, 1]] * 3  # each request's two steps, in order
    assert all(latency_s > 0.0 for _, latency_s, _ in steps)

    # A results.json from before runs reported their decode phase: compare reads it off the outcomes.
    decode_p50 = {(r["system"], r["qps"]): r["decode_p50_s"] for r in data["runs"]}
    older = {**data, "runs": [{k: v for k, v in r.items() if k != "decode_p50_s"} for r in data["runs"]]}
    (out / "results.json").write_text(json.dumps(older))
    compare = [
        "simulate",
        "--compare",
        str(out / "results.json"),
        "--out",
        str(tmp_path / "sim"),
        "--speed-trace",
    ]
    assert main(compare) == 0
    rows = json.loads((tmp_path / "sim" / "compare.json").read_text())["rows"]
    assert len(rows) == 6 and all(r["sim_satisfaction"] == 1.0 for r in rows)
    assert all(r["real_decode_p50_s"] == decode_p50[r["system"], r["qps"]] > 0.0 for r in rows)
    assert all(r["sim_decode_p50_s"] > 0.0 for r in rows)
    assert "largest |difference| 0.0 pp" in capsys.readouterr().out
    noisy = [*compare[:-2], str(tmp_path / "sim_noisy"), "--speed-trace", "--step-noise", "measured"]
    assert main(noisy) == 0
    sim_runs = json.loads((tmp_path / "sim_noisy" / "results.json").read_text())["runs"]
    assert all(r["step_noise"] >= 0.0 for r in sim_runs)
    # One engine's decodes are known from its outcomes: its speed is taken net of their
    # interference, which the simulator then adds where its own decodes run.
    interfering = [*noisy, "--decode-interference", "0.25"]
    interfering[interfering.index(str(tmp_path / "sim_noisy"))] = str(tmp_path / "sim_interfering")
    assert main(interfering) == 0
    sim_runs = json.loads((tmp_path / "sim_interfering" / "results.json").read_text())["runs"]
    assert [r["decode_interference"] for r in sim_runs] == [0.25] * 6
    assert main([a for a in noisy if a != "--speed-trace"]) == 2  # measured noise needs the trace
    assert "needs --speed-trace" in capsys.readouterr().err
    with_steps = LatencyPredictor.load(profile)
    with_steps.meta["patch_cache_steps"] = [1.0, 0.2]  # a cached step: full, then mostly reused
    cache_costs = with_steps.save(tmp_path / "cache_cost.json")
    seeded = [*noisy, "--noise-seeds", "3", "--patch-cache-steps", str(cache_costs)]
    seeded[seeded.index(str(tmp_path / "sim_noisy"))] = str(tmp_path / "sim_seeded")
    assert main(seeded) == 0
    sim_runs = json.loads((tmp_path / "sim_seeded" / "results.json").read_text())["runs"]
    jittered = [r for r in sim_runs if r["step_noise"] > 0.0]
    assert jittered and all(r["noise_seeds"] == 3 for r in jittered)
    assert all(len(r["seed_satisfaction"]) == r["noise_seeds"] for r in sim_runs)
    no_profile = [*seeded[:-1], str(profile)]  # a cost file without a cache profile
    assert main(no_profile) == 2
    assert "no per-step patch cache profile" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main([*seeded[:-4], "--noise-seeds", "0"])
    assert exc.value.code == 2


def test_report_lists_where_patchedserve_falls_short() -> None:
    from patchedserve.bench.report import satisfaction_matrix, shortfalls

    runs = [
        {"system": s, "qps": q, "slo_scale": 5.0, "slo_satisfaction": v}
        for s, pts in {"patchedserve": [(1.0, 1.0), (2.0, 0.7)], "nirvana": [(1.0, 1.0), (2.0, 0.8)]}.items()
        for q, v in pts
    ]
    assert shortfalls(runs) == ["- 1 replica(s), 2 req/s: patchedserve 0.7000 < nirvana 0.8000"]
    assert "| nirvana | 1.000 | 0.800 |" in satisfaction_matrix(runs)


def test_report_takes_ratios_and_shortfalls_against_a_chosen_reference(tmp_path: Path) -> None:
    from patchedserve.bench.metrics import goodput_at_target
    from patchedserve.bench.report import report_lines

    points = {
        "patchedserve": [1.0, 0.7, 0.2],
        "nirvana": [1.0, 0.8, 0.5],
        "patchedserve-cache": [1.0, 0.9, 0.6],
    }
    runs = [
        {"system": s, "qps": q, "slo_scale": 5.0, "slo_satisfaction": v, "requests": 10, "replicas": 1}
        for s, values in points.items()
        for q, v in zip((1.0, 2.0, 3.0), values, strict=True)
    ]
    for r in runs:
        r.update(goodput_rps=None, p50_s=None, p90_s=None, p99_s=None, drop_rate=0.0, duration_s=10.0)
    data = {"meta": {}, "runs": runs, "goodput_at_90": goodput_at_target(runs)}
    default = "\n".join(report_lines(data))
    assert "patchedserve 0.7000 < nirvana 0.8000" in default
    cached = "\n".join(report_lines(data, "patchedserve-cache"))
    assert "| patchedserve-cache / system |" in cached
    # QPS at 90%: patchedserve-cache 2.0 exactly, nirvana 1 + 0.1/0.2 = 1.5 -> ratio 1.33
    assert "| nirvana@5x | 1.50 | 1.33 |" in cached
    assert "- none: patchedserve-cache is at or above every other system at every point" in cached
    path = tmp_path / "results.json"
    path.write_text(json.dumps(data))
    assert main(["bench", "report", str(path), "--reference", "no-such-system"]) == 2
    assert main(["bench", "report", str(path), "--reference", "nirvana"]) == 0


@pytest.mark.parametrize("flag", ["--cpus-per-replica", "--replica-profile", "--ray-address"])
def test_a_replica_flag_without_replicas_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flag: str
) -> None:
    value = {"--cpus-per-replica": "1", "--replica-profile": str(write_profile(tmp_path / "p.json"))}
    args = ["bench", "slo", "--qps", "1", "--duration", "1", "--patch-size", "64", "--out", str(tmp_path)]
    assert main([*args, flag, value.get(flag, "auto")]) == 2
    assert f"{flag} is for a run on Ray replicas: add --replicas N" in capsys.readouterr().err


def test_replicas_without_ray_installed_is_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    monkeypatch.setitem(sys.modules, "patchedserve.cluster.ray_group", None)  # nor imported by other tests
    args = ["bench", "slo", "--qps", "1", "--duration", "1", "--patch-size", "64", "--out", str(tmp_path)]
    assert main([*args, "--replicas", "2"]) == 2
    assert "--replicas needs Ray" in capsys.readouterr().err
