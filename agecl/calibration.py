"""Post-hoc age calibration: a monotone map from a model's predicted age to a calibrated one, fitted
on held-out predictions and applied to a test set's.

Why: a model fine-tuned on a young set (FG-NET is 71% under 20) shrinks its predictions towards the
young ages it saw most: when it says 30, the person is older on average. A line fitted on predictions
for people the model never trained on, `age = intercept + slope * predicted`, stretches them back.
It is fitted by least absolute deviations, since MAE is what it must lower, so a few far-off faces do
not pull it; `kind="log"` fits the same line to log(1 + age), where errors that grow with age weigh
alike. The fit must never see a test fold: its source is other people's held-out predictions
(benchmarks/calibrate.py says which, for the FG-NET rows).

A stack (`AgeStack`, `fit_stack`) is the same line with more than one input: the predictions of
several models for the same faces, `age = intercept + w_1 * predicted_1 + w_2 * predicted_2 ...`.
Why: a model fine-tuned on FG-NET and the AAF model it started from err differently (the AAF model,
never fine-tuned, is biased by about +10 years on FG-NET's children but nearer the truth on its
adults), and a line fitted on held-out people can weigh one against the other where a plain average
of the two cannot. (On FG-NET's select halves it did not: each half wanted a different plane;
benchmarks/RESULTS.md, twentieth session.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

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


@dataclass(frozen=True)
class AgeStack:
    """`combined = intercept + sum_k weights[k] * column k`: several models' predicted ages of the
    same faces (column k from `inputs[k]`), in years, never below 0."""

    inputs: tuple[str, ...]  # what each column is (the run folders the predictions came from)
    intercept: float
    weights: tuple[float, ...]
    n: int  # faces it was fitted on

    def __post_init__(self):
        if len(self.inputs) != len(self.weights) or not self.inputs:
            raise ValueError(f"stack: {len(self.weights)} weights for {len(self.inputs)} inputs")

    def apply(self, columns: np.ndarray) -> np.ndarray:
        """(N, K) predicted ages, column k from inputs[k] -> (N,) combined ages, float32, >= 0."""
        x = np.asarray(columns, np.float64)
        if x.ndim != 2 or x.shape[1] != len(self.weights):
            raise ValueError(f"stack of {len(self.weights)} inputs applied to an array of shape {x.shape}")
        return np.maximum(self.intercept + x @ np.asarray(self.weights), 0.0).astype(np.float32)

    def to_dict(self) -> dict:
        return {"inputs": list(self.inputs), "intercept": self.intercept, "weights": list(self.weights), "n": self.n}

    @classmethod
    def from_dict(cls, d: dict) -> "AgeStack":
        return cls(inputs=tuple(map(str, d["inputs"])), intercept=float(d["intercept"]),
                   weights=tuple(map(float, d["weights"])), n=int(d["n"]))


def _lad_plane(x: np.ndarray, y: np.ndarray, iterations: int = 500) -> np.ndarray:
    """(K + 1,) [intercept, w_1 .. w_K] minimising mean |y - intercept - x @ w| for x (N, K).

    Iteratively reweighted least squares (each residual weighted by 1 / |residual|, floored so that
    faces already on the plane do not take every weight), from the least-squares plane; the floor
    decays so that the fit ends within a hair of the exact least-absolute-deviation plane.
    """
    a = np.column_stack([np.ones(len(y)), x])
    w = np.linalg.lstsq(a, y, rcond=None)[0]
    floor = max(float(np.abs(y - a @ w).mean()), 1e-6)
    for _ in range(iterations):
        r = np.sqrt(1.0 / np.maximum(np.abs(y - a @ w), floor))
        w_new = np.linalg.lstsq(a * r[:, None], y * r, rcond=None)[0]
        done = np.abs(w_new - w).max() < 1e-10 and floor <= 1e-6
        w, floor = w_new, max(floor * 0.5, 1e-6)
        if done:
            break
    return w


def fit_stack(columns: np.ndarray, ages: np.ndarray, inputs: tuple[str, ...] | list[str]) -> AgeStack:
    """The least-absolute-deviation plane from held-out predictions `columns` (N, K), column k from
    `inputs[k]`, to true `ages` (N,). Needs more faces than inputs, and inputs that are not constant."""
    x = np.asarray(columns, np.float64)
    y = np.asarray(ages, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[1] != len(inputs):
        raise ValueError(f"stack fit: columns of shape {x.shape} for {len(inputs)} inputs")
    if len(x) != len(y):
        raise ValueError(f"stack fit: {len(x)} predictions for {len(y)} ages")
    if len(y) <= x.shape[1] + 1 or np.any(np.ptp(x, axis=0) == 0):
        raise ValueError(f"stack fit: needs more than {x.shape[1] + 1} faces and no constant input")
    w = _lad_plane(x, y)
    return AgeStack(inputs=tuple(map(str, inputs)), intercept=float(w[0]), weights=tuple(map(float, w[1:])), n=len(y))
