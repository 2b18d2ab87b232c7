"""Post-hoc age calibration: a monotone map from a model's predicted age to a calibrated one, fitted
on held-out predictions and applied to a test set's.

Why: a model fine-tuned on a young set (FG-NET is 71% under 20) shrinks its predictions towards the
young ages it saw most: when it says 30, the person is older on average. A line fitted on predictions
for people the model never trained on, `age = intercept + slope * predicted`, stretches them back.
It is fitted by least absolute deviations, since MAE is what it must lower, so a few far-off faces do
not pull it; `kind="log"` fits the same line to log(1 + age), where errors that grow with age weigh
alike. The fit must never see a test fold: its source is other people's held-out predictions
(benchmarks/calibrate.py says which, for the FG-NET rows).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from agecl import evaluate

KINDS = ("linear", "log")
_SLOPES = (0.0, 5.0)  # the slope's search range: 0 (every prediction alike) to 5 (a far wider spread)


@dataclass(frozen=True)
class AgeCalibration:
    """`calibrated = intercept + slope * predicted` (`kind="log"`: in log(1 + age), back to years)."""

    kind: str
    intercept: float
    slope: float
    n: int  # predictions it was fitted on

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"calibration kind {self.kind!r}: expected one of {', '.join(KINDS)}")
        if not self.slope >= 0:
            raise ValueError(f"calibration slope {self.slope}: must be >= 0 (the map keeps the order of ages)")

    def apply(self, expected: np.ndarray) -> np.ndarray:
        """(N,) predicted ages, years -> (N,) calibrated ages, years, float32, never below 0."""
        x = np.asarray(expected, np.float64)
        if self.kind == "log":
            out = np.expm1(self.intercept + self.slope * np.log1p(np.maximum(x, 0.0)))
        else:
            out = self.intercept + self.slope * x
        return np.maximum(out, 0.0).astype(np.float32)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "AgeCalibration":
        return cls(kind=str(d["kind"]), intercept=float(d["intercept"]), slope=float(d["slope"]), n=int(d["n"]))


def _lad_line(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(intercept, slope) minimising mean |y - intercept - slope * x| over slope in _SLOPES.

    For a given slope the best intercept is the median of y - slope * x, and the error left is a
    convex function of the slope (a partial minimum of a jointly convex one), so a golden-section
    search finds the slope to 1e-9.
    """

    def err(slope: float) -> tuple[float, float]:
        r = y - slope * x
        a = float(np.median(r))
        return float(np.abs(r - a).mean()), a

    lo, hi = _SLOPES
    g = (np.sqrt(5.0) - 1.0) / 2.0
    c, d = hi - g * (hi - lo), lo + g * (hi - lo)
    fc, fd = err(c)[0], err(d)[0]
    while hi - lo > 1e-9:
        if fc <= fd:
            hi, d, fd = d, c, fc
            c = hi - g * (hi - lo)
            fc = err(c)[0]
        else:
            lo, c, fc = c, d, fd
            d = lo + g * (hi - lo)
            fd = err(d)[0]
    slope = float(lo + hi) / 2.0
    return err(slope)[1], slope


def fit(expected: np.ndarray, ages: np.ndarray, kind: str = "linear") -> AgeCalibration:
    """The line of `kind` from held-out predictions `expected` (N,) to true `ages` (N,), by least
    absolute deviations. Needs at least two different predictions."""
    x = np.asarray(expected, np.float64).reshape(-1)
    y = np.asarray(ages, np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"calibration fit: {len(x)} predictions for {len(y)} ages")
    if kind not in KINDS:
        raise ValueError(f"calibration kind {kind!r}: expected one of {', '.join(KINDS)}")
    if len(np.unique(x)) < 2:
        raise ValueError(f"calibration fit: needs at least two different predictions, got {len(np.unique(x))}")
    if kind == "log":
        x, y = np.log1p(np.maximum(x, 0.0)), np.log1p(np.maximum(y, 0.0))
    intercept, slope = _lad_line(x, y)
    return AgeCalibration(kind=kind, intercept=intercept, slope=slope, n=len(x))


def held_out_predictions(run: Path | str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(expected, ages, identities) pooled over a run folder's test predictions: every
    `fold-*/predictions.npz` of a protocol run, or the run's own `predictions.npz`. Raises
    FileNotFoundError naming the run when it has none."""
    p = evaluate.load_predictions(run)
    return p.expected, p.ages, p.identities
