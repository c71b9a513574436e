"""``LatencyPredictor``: one denoising step's latency for a candidate active set, and a request's
standalone latency, on this machine; follows the machine online.

Model: a non-negative linear model over the cost-term features of ``features`` (a closed form fit
by scikit-learn's positive least squares, weighted by 1/latency² so that it minimises *relative*
error, the quantity the scheduler's slack and the MAPE target are about). Why linear and not the
paper's MLP: the features are the step's cost terms, so a linear model is the right shape; it
extrapolates sanely to batch sizes and resolutions the profile did not cover (an MLP does not);
its coefficients have units (seconds per patch, per patch² of attention, ...) one can read; and
it predicts in about a microsecond, incrementally, which keeps a decision over 100 waiting
requests well under a millisecond. Measured (``patchedserve profile --compare``, tiny-sdxl, 200
mixes, this 2-core machine): held-out MAPE 2.2% for this fit, 3.2% fitting absolute instead of
relative error, 19% for the paper's MLP over requests per resolution, 11% for an MLP over our
features; mixes with a resolution left out of the fit are predicted within 2.1%.

Online: every executed step feeds ``observe``, which moves a multiplicative correction factor
towards observed / modelled latency (``online.follow``: a moving average that speeds up when the
machine's speed shifts). The factor scales every prediction.

Stored as JSON (never pickles). Built by ``profile``; read by the engine and the schedulers.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from patchedserve.errors import InvalidRequestError
from patchedserve.scheduler.features import FEATURE_NAMES, Entry, MixSums
from patchedserve.scheduler.online import OnlineConfig, follow

_RESOLUTIONS = FEATURE_NAMES.index("resolutions")
_PATCH_GROUPS = FEATURE_NAMES.index("patch_groups")

FORMAT = "patchedserve-latency-profile"
"""Value of the ``format`` key of a profile file."""
VERSION = 1
"""Version of the profile file layout."""


@dataclass(frozen=True)
class Overhead:
    """Per-request work outside the denoising loop, measured by the profile (0 when unknown)."""

    encode_s: float = 0.0
    """Prompt encoding of one request (both branches)."""
    decode_base_s: float = 0.0
    """Fixed part of decoding one image with the VAE."""
    decode_s_per_mpx: float = 0.0
    """Decoding time per megapixel of the image."""

    def decode_s(self, width: int, height: int) -> float:
        return self.decode_base_s + self.decode_s_per_mpx * width * height / 1e6


@dataclass(frozen=True)
class StepSample:
    """One measured step: the mix and its latency."""

    entries: tuple[Entry, ...]
    """The requests of the step."""
    latency_s: float
    """Measured latency (the profile stores the median of its repeats)."""


def mape(predicted: Sequence[float], observed: Sequence[float]) -> float:
    """Mean absolute percentage error, in percent."""
    errors = [abs(p - o) / o for p, o in zip(predicted, observed, strict=True)]
    return 100.0 * sum(errors) / max(len(errors), 1)


def fit_coefficients(samples: Sequence[StepSample], patch_size: int) -> list[float]:
    """Non-negative least squares on relative error: minimises Σ ((x·c - y) / y)², c >= 0."""
    from sklearn.linear_model import LinearRegression  # imported here: only fitting needs it

    if not samples:
        raise ValueError("cannot fit the latency predictor on no samples")
    x = np.array([MixSums.of(s.entries, patch_size).vector() for s in samples])  # [S, F]
    y = np.array([s.latency_s for s in samples])  # [S]
    scale = np.maximum(x.max(axis=0), 1e-12)  # [F] columns to [0, 1] for conditioning
    model = LinearRegression(positive=True, fit_intercept=False)
    model.fit(x / scale, y, sample_weight=1.0 / y**2)
    return [float(c) for c in model.coef_ / scale]


@dataclass
class LatencyPredictor:
    """Predicts step and standalone latencies; see the module docstring."""

    coef: tuple[float, ...]
    """Seconds per unit of each feature of ``FEATURE_NAMES`` (non-negative)."""
    patch_size: int
    """Patch side in image pixels the profile was measured with."""
    overhead: Overhead = field(default_factory=Overhead)
    """Encode/decode costs from the profile."""
    online: OnlineConfig = field(default_factory=OnlineConfig)
    """Online update settings."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Where the profile came from (model, device, threads, ...); informational."""
    log_correction: float = 0.0
    """Moving average of log(observed / model); predictions are scaled by its exponential."""
    num_observed: int = 0
    """Steps fed to ``observe`` so far."""

    def __post_init__(self) -> None:
        self._entry_memo: dict[Entry, tuple[float, int]] = {}  # entry -> (additive model s, patches)
        self._streak = 0  # signed count of consecutive steps off by more than the shift threshold
        if len(self.coef) != len(FEATURE_NAMES):
            raise ValueError(f"expected {len(FEATURE_NAMES)} coefficients, got {len(self.coef)}")
        if self.patch_size <= 0:
            raise ValueError(f"patch_size must be positive, got {self.patch_size}")
        self.coef = tuple(float(c) for c in self.coef)

    # ------------------------------------------------------------------ building
    @classmethod
    def fit(
        cls,
        samples: Sequence[StepSample],
        patch_size: int,
        overhead: Overhead | None = None,
        online: OnlineConfig | None = None,
        meta: Mapping[str, Any] | None = None,
    ) -> LatencyPredictor:
        """Fits the step model on measured mixes (see ``fit_coefficients``)."""
        return cls(
            coef=tuple(fit_coefficients(samples, patch_size)),
            patch_size=patch_size,
            overhead=overhead or Overhead(),
            online=online or OnlineConfig(),
            meta=dict(meta or {}),
        )

    # ------------------------------------------------------------------ prediction
    @property
    def correction(self) -> float:
        """Current online factor: observed / modelled latency, smoothed."""
        return math.exp(self.log_correction)

    def model_s(self, x: Sequence[float]) -> float:
        """The fitted model's latency for a feature vector, without the online correction."""
        return sum(c * v for c, v in zip(self.coef, x, strict=True))

    def predict_features(self, x: Sequence[float]) -> float:
        """Predicted step latency for a feature vector (see ``MixSums.vector``)."""
        return self.model_s(x) * self.correction

    def mix(self, entries: Sequence[Entry] = ()) -> MixSums:
        """An additive summary of an active set; extend it with ``step_with_s``."""
        return MixSums.of(entries, self.patch_size)

    def step_s(self, mix: MixSums) -> float:
        """Predicted step latency of ``mix``; 0 for an empty mix (no step runs)."""
        return self.predict_features(mix.vector()) if mix.requests else 0.0

    def step_with_s(self, mix: MixSums, entry: Entry) -> float:
        """Predicted step latency of ``mix`` plus one request, in O(1)."""
        return self.predict_features(mix.vector_with(entry))

    def step_with_fn(self, mix: MixSums) -> Callable[[Entry], float]:
        """A function entry -> predicted step latency of ``mix`` plus that entry, for scanning many
        candidates against one active set: the model is linear, so each call is a dict lookup and
        four additions (about a microsecond)."""
        base = self.model_s(mix.vector())
        resolutions, groups = mix.requests_per_resolution, mix.entries_per_patch_count
        c_res, c_group = self.coef[_RESOLUTIONS], self.coef[_PATCH_GROUPS]
        correction = self.correction
        terms = self.entry_terms

        def step_with(entry: Entry) -> float:
            additive, n = terms(entry)
            new_res = c_res if (entry[0], entry[1]) not in resolutions else 0.0
            new_group = c_group if n not in groups else 0.0
            return (base + additive + new_res + new_group) * correction

        return step_with

    def entry_terms(self, entry: Entry) -> tuple[float, int]:
        """Model seconds an entry adds through the additive features, and its patches (memoised)."""
        terms = self._entry_memo.get(entry)
        if terms is None:
            alone = MixSums.of([entry], self.patch_size)
            additive = (
                self.model_s(alone.vector())
                - self.coef[0]
                - self.coef[_RESOLUTIONS]
                - self.coef[_PATCH_GROUPS]
            )
            terms = (additive, next(iter(alone.entries_per_patch_count)))
            self._entry_memo[entry] = terms
        return terms

    def solo_step_s(self, entry: Entry, corrected: bool = True) -> float:
        """Predicted latency of one step of this request alone (memoised, O(1))."""
        additive, _ = self.entry_terms(entry)
        alone = additive + self.coef[0] + self.coef[_RESOLUTIONS] + self.coef[_PATCH_GROUPS]
        return alone * self.correction if corrected else alone

    def predict_step(self, entries: Sequence[Entry]) -> float:
        """Predicted latency of one denoising step over these requests (seconds)."""
        return self.step_s(self.mix(entries))

    def encode_s(self) -> float:
        """Predicted prompt encoding time of one request, with the online correction."""
        return self.overhead.encode_s * self.correction

    def decode_s(self, width: int, height: int) -> float:
        """Predicted VAE decode time of one image, with the online correction."""
        return self.overhead.decode_s(width, height) * self.correction

    def predict_standalone(
        self,
        width: int,
        height: int,
        steps: int,
        cfg: bool,
        include_overhead: bool = True,
        corrected: bool = True,
    ) -> float:
        """Latency of a request running alone: ``steps`` solo steps (+ encode and decode).

        ``corrected=False`` gives the profile's figure, without the online correction: what SLO
        deadlines are derived from, so that a slow machine does not stretch its own objectives.
        """
        scale = 1.0 if corrected else 1.0 / self.correction
        total = steps * self.solo_step_s((width, height, cfg))
        if include_overhead:
            total += self.encode_s() + self.decode_s(width, height)
        return total * scale

    # ------------------------------------------------------------------ online update
    def observe(self, entries: Sequence[Entry], latency_s: float) -> None:
        """Feeds one executed step; moves the correction factor towards observed / model."""
        if not entries or latency_s <= 0.0:
            return
        modelled = self.model_s(self.mix(entries).vector())
        if modelled <= 0.0:
            return
        self.log_correction, self._streak = follow(
            self.log_correction, self._streak, math.log(latency_s / modelled), self.online
        )
        self.num_observed += 1

    # ------------------------------------------------------------------ storage
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "patch_size": self.patch_size,
            "features": list(FEATURE_NAMES),
            "coef": list(self.coef),
            "overhead": asdict(self.overhead),
            "online": asdict(self.online),
            "log_correction": self.log_correction,
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LatencyPredictor:
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise InvalidRequestError(
                f"not a latency profile (format {data.get('format')!r}, version {data.get('version')!r}); "
                f"expected {FORMAT!r} version {VERSION}: make one with `patchedserve profile`",
                field="profile",
            )
        if tuple(data["features"]) != FEATURE_NAMES:
            raise InvalidRequestError(
                f"profile features {data['features']} differ from this version's {list(FEATURE_NAMES)}; "
                "re-run `patchedserve profile`",
                field="profile",
            )
        return cls(
            coef=tuple(data["coef"]),
            patch_size=int(data["patch_size"]),
            overhead=Overhead(**data.get("overhead", {})),
            online=OnlineConfig(**data.get("online", {})),
            meta=dict(data.get("meta", {})),
            log_correction=float(data.get("log_correction", 0.0)),
        )

    def save(self, path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
        """Writes the predictor as JSON; ``extra`` keys (e.g. the raw samples) are stored alongside."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({**self.to_dict(), **(extra or {})}, indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], online: OnlineConfig | None = None) -> LatencyPredictor:
        """Reads a profile written by ``save`` (``patchedserve profile --out``)."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError as err:
            raise InvalidRequestError(f"profile {path} does not exist", field="profile") from err
        except json.JSONDecodeError as err:
            raise InvalidRequestError(f"profile {path} is not JSON: {err}", field="profile") from err
        predictor = cls.from_dict(data)
        if online is not None:
            predictor.online = online
        return predictor
