"""The latency predictor: fit, fast paths, online update and storage, on synthetic costs."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from patchedserve.errors import InvalidRequestError
from patchedserve.scheduler import FEATURE_NAMES, LatencyPredictor, MixSums, Overhead, StepSample
from patchedserve.scheduler.features import Entry, feature_vector
from patchedserve.scheduler.fitting import TimedRun, error_report, fit_with_drift
from patchedserve.scheduler.predictor import mape

PATCH = 256
TRUE_COEF = (0.012, 0.015, 0.0008, 0.002, 0.0, 0.001, 0.004, 0.003)
SIZES = [(256, 256), (512, 256), (256, 512), (512, 512), (768, 512), (768, 768)]


def true_latency(entries: list[Entry]) -> float:
    return sum(c * x for c, x in zip(TRUE_COEF, feature_vector(entries, PATCH), strict=True))


def random_mix(rng: random.Random, sizes: list[tuple[int, int]] = SIZES) -> list[Entry]:
    return [(*rng.choice(sizes), rng.random() < 0.5) for _ in range(rng.randint(1, 12))]


def samples(n: int, seed: int, noise: float = 0.01, sizes: list[tuple[int, int]] = SIZES) -> list[StepSample]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        mix = random_mix(rng, sizes)
        out.append(StepSample(tuple(mix), true_latency(mix) * (1.0 + rng.uniform(-noise, noise))))
    return out


def error_on(p: LatencyPredictor, test: list[StepSample]) -> float:
    return mape([p.predict_step(s.entries) for s in test], [s.latency_s for s in test])


def test_fit_recovers_a_known_cost_function() -> None:
    p = LatencyPredictor.fit(samples(150, seed=0), PATCH)
    assert error_on(p, samples(50, seed=1)) < 1.0
    for name, got, want in zip(FEATURE_NAMES, p.coef, TRUE_COEF, strict=True):
        if name in ("total_patches", "attention"):  # the dominant terms are identified well
            assert got == pytest.approx(want, rel=0.1)


def test_an_unprofiled_resolution_is_priced_from_its_cost_terms() -> None:
    p = LatencyPredictor.fit(samples(150, seed=0), PATCH)
    unseen = samples(50, seed=2, sizes=[(1024, 1024), (1024, 768), (256, 256)])
    assert error_on(p, unseen) < 2.0


def test_fast_paths_agree_with_the_full_prediction() -> None:
    p = LatencyPredictor(coef=TRUE_COEF, patch_size=PATCH, log_correction=math.log(1.3))
    rng = random.Random(3)
    for _ in range(50):
        active = random_mix(rng)
        mix = p.mix(active)
        step_with = p.step_with_fn(mix)
        for candidate in random_mix(rng):
            full = p.predict_step([*active, candidate])
            assert step_with(candidate) == pytest.approx(full, rel=1e-12)
            assert p.step_with_s(mix, candidate) == pytest.approx(full, rel=1e-12)
        assert p.solo_step_s(active[0]) == pytest.approx(p.predict_step(active[:1]), rel=1e-12)


def test_mix_sums_add_and_remove_round_trip() -> None:
    rng = random.Random(4)
    entries = random_mix(rng) + random_mix(rng)
    mix = MixSums.of(entries, PATCH)
    for e in entries[5:]:
        mix.remove(e)
    assert mix == MixSums.of(entries[:5], PATCH)


@pytest.mark.parametrize("slowdown", [2.0, 0.5])
def test_online_update_recovers_within_50_steps(slowdown: float) -> None:
    p = LatencyPredictor.fit(samples(150, seed=0), PATCH)
    rng = random.Random(5)
    for _ in range(30):  # steady state on the profiled machine, 3% noise
        mix = random_mix(rng)
        p.observe(mix, true_latency(mix) * rng.uniform(0.97, 1.03))
    errors = []
    for _ in range(50):
        mix = random_mix(rng)
        actual = slowdown * true_latency(mix) * rng.uniform(0.97, 1.03)
        errors.append(abs(p.predict_step(mix) / actual - 1.0))
        p.observe(mix, actual)
    assert errors[0] > 0.4
    assert max(errors[15:]) < 0.05  # the shift is detected; alpha alone would need about 25 steps


def test_hiccups_move_the_correction_only_a_little() -> None:
    p = LatencyPredictor(coef=TRUE_COEF, patch_size=PATCH)
    mix: list[Entry] = [(512, 512, True)]
    for _ in range(2):  # two in a row: not yet a shift of machine speed
        p.observe(mix, 100.0 * true_latency(mix))
    p.observe(mix, true_latency(mix))
    assert p.correction < 1.25  # alpha x log(clip) per hiccup; the fast mode would exceed 1.5


def test_standalone_latency_adds_overheads_and_deadline_figure_ignores_correction() -> None:
    overhead = Overhead(encode_s=0.01, decode_base_s=0.02, decode_s_per_mpx=0.1)
    p = LatencyPredictor(coef=TRUE_COEF, patch_size=PATCH, overhead=overhead)
    solo = p.predict_step([(512, 512, True)])
    assert p.predict_standalone(512, 512, 20, True) == pytest.approx(20 * solo + 0.01 + 0.02 + 0.1 * 0.262144)
    assert p.predict_standalone(512, 512, 20, True, include_overhead=False) == pytest.approx(20 * solo)
    before = p.predict_standalone(512, 512, 20, True)
    p.log_correction = math.log(2.0)
    assert p.predict_standalone(512, 512, 20, True) == pytest.approx(2 * before)
    assert p.predict_standalone(512, 512, 20, True, corrected=False) == pytest.approx(before)


def test_save_load_round_trip(tmp_path: Path) -> None:
    overhead = Overhead(encode_s=0.003)
    p = LatencyPredictor.fit(samples(60, seed=0), PATCH, overhead=overhead, meta={"model": "x"})
    p.observe([(512, 512, False)], 0.5)
    path = p.save(tmp_path / "profile.json", extra={"samples": []})
    data = json.loads(path.read_text())
    assert data["features"] == list(FEATURE_NAMES) and data["samples"] == []
    q = LatencyPredictor.load(path)
    assert q.coef == p.coef and q.overhead == p.overhead and q.meta == {"model": "x"}
    mix: list[Entry] = [(768, 512, True), (256, 256, False)]
    assert q.predict_step(mix) == pytest.approx(p.predict_step(mix), rel=1e-12)


def test_load_rejects_what_is_not_a_profile(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(InvalidRequestError, match="profile"):
        LatencyPredictor.load(bad)
    with pytest.raises(InvalidRequestError, match="does not exist"):
        LatencyPredictor.load(tmp_path / "missing.json")


def test_drift_correction_removes_a_slow_change_of_machine_speed() -> None:
    rng = random.Random(6)
    mixes = [tuple(random_mix(rng)) for _ in range(80)]
    runs = []
    for round_index in range(3):  # the machine's speed drifts slowly, as other work comes and goes
        for i, mix in enumerate(mixes):
            t = round_index * len(mixes) + i
            speed = 1.0 + 0.3 * math.sin(t / 25.0)
            runs.append(TimedRun(i, true_latency(list(mix)) * speed * rng.uniform(0.99, 1.01)))
    train, test = list(range(0, 80, 4)) + list(range(1, 80, 4)) + list(range(2, 80, 4)), list(range(3, 80, 4))
    p, labels, raw = fit_with_drift(mixes, runs, sorted(train), PATCH, window=10)
    report = error_report(p, mixes, labels, raw, sorted(train), test)
    assert report["heldout_mape"] < 2.0 < report["heldout_mape_raw"]


def test_profile_command_writes_a_loadable_profile_and_a_report(tmp_path: Path) -> None:
    from patchedserve.cli import main

    out, report = tmp_path / "p.json", tmp_path / "r.json"
    argv = ["profile", "--model", "tiny-sd15", "--mixes", "8", "--max-requests", "2", "--repeats", "1"]
    argv += ["--sizes", "256x256", "512x256", "--out", str(out), "--json", str(report)]
    assert main(argv) == 0
    data = json.loads(report.read_text())
    assert data["n_train"] + data["n_test"] == 8 and data["n_test"] > 0
    assert 0.0 < data["heldout_mape"] < math.inf  # measured on held-out mixes: a number, not NaN
    p = LatencyPredictor.load(out)
    assert p.patch_size == 256 and p.predict_step([(256, 256, True)]) > 0.0
    assert p.meta["model"] == "tiny-sd15" and p.overhead.decode_s(256, 256) > 0.0
