"""Post-hoc age calibration: the least-absolute-deviation line against a brute-force search, its
robustness and its log form, the errors it raises, the predictions it reads from real run folders,
and benchmarks/calibrate.py end to end on run folders written by agecl.evaluate (each photo
calibrated by a line fitted on the other half's people only, whatever the run it is fitted from)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agecl import calibration
from agecl.calibration import AgeCalibration, fit, held_out_predictions
from agecl.evaluate import Predictions, aggregate, metrics, write_fold_results
from agecl.shards import write_split

ROOT = Path(__file__).resolve().parents[1]


def _shrunk(n: int, seed: int = 0):
    """Ages 0-70 and predictions shrunk towards 12 (slope 0.6), Laplace noise of scale 2."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 71, n).astype(np.float64)
    return 12 + 0.6 * (ages - 12) + rng.laplace(0, 2, n), ages


def _grid_best(x, y):
    """The lowest mean absolute error of any line, by brute force: slopes on a 1e-4 grid, each with
    its best intercept (the median residual)."""
    slopes = np.arange(0.0, 5.0, 1e-4)
    best = np.inf
    for chunk in np.array_split(slopes, 50):
        r = y[None, :] - chunk[:, None] * x[None, :]
        a = np.median(r, axis=1, keepdims=True)
        best = min(best, float(np.abs(r - a).mean(axis=1).min()))
    return best


def test_fit_is_the_least_absolute_deviation_line():
    x, y = _shrunk(400)
    c = fit(x, y)
    err = np.abs(y - (c.intercept + c.slope * x)).mean()
    assert err <= _grid_best(x, y) + 1e-6  # no line on the grid does better
    # Shrinkage 0.6 undone: slope about 1 / 0.6, and the calibrated MAE well below the raw one.
    assert abs(c.slope - 1 / 0.6) < 0.1
    assert np.abs(c.apply(x) - y).mean() < 0.8 * np.abs(x - y).mean()
    assert c.n == 400


def test_fit_is_not_pulled_by_a_few_far_off_faces():
    x, y = _shrunk(400)
    clean = fit(x, y)
    x2 = x.copy()
    x2[:8] = 69.0  # 2 % of the predictions wildly wrong
    dirty = fit(x2, y)
    assert abs(dirty.slope - clean.slope) < 0.05
    # A least-squares line moves far more: the reason for absolute deviations.
    ls_clean, ls_dirty = np.polyfit(x, y, 1)[0], np.polyfit(x2, y, 1)[0]
    assert abs(ls_dirty - ls_clean) > 3 * abs(dirty.slope - clean.slope)


def test_log_kind_fits_in_log_of_one_plus_age():
    rng = np.random.default_rng(1)
    ages = rng.integers(0, 71, 500).astype(np.float64)
    predicted = np.expm1(0.3 + 0.8 * np.log1p(ages) + rng.laplace(0, 0.02, 500))
    c = fit(predicted, ages, "log")
    assert c.kind == "log"
    assert abs(c.slope - 1 / 0.8) < 0.03
    assert abs(c.intercept + 0.3 / 0.8) < 0.1
    # apply goes back to years: the truth within a year for most faces.
    assert np.median(np.abs(c.apply(predicted) - ages)) < 1.0


def test_apply_keeps_order_and_never_goes_below_zero():
    c = AgeCalibration(kind="linear", intercept=-5.0, slope=1.5, n=10)
    out = c.apply(np.array([0.0, 1.0, 3.0, 10.0, 40.0]))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [0.0, 0.0, 0.0, 10.0, 55.0])
    assert AgeCalibration.from_dict(json.loads(json.dumps(c.to_dict()))) == c


def test_bad_calibrations_are_refused():
    with pytest.raises(ValueError, match="kind 'cubic'"):
        AgeCalibration(kind="cubic", intercept=0.0, slope=1.0, n=1)
    with pytest.raises(ValueError, match="slope -1"):
        AgeCalibration(kind="linear", intercept=0.0, slope=-1.0, n=1)
    with pytest.raises(ValueError, match="kind 'cubic'"):
        fit(np.arange(5.0), np.arange(5.0), "cubic")
    with pytest.raises(ValueError, match="two different predictions"):
        fit(np.full(5, 7.0), np.arange(5.0))
    with pytest.raises(ValueError, match="4 predictions for 5 ages"):
        fit(np.arange(4.0), np.arange(5.0))


# --- Run folders, as agecl-train and agecl-eval write them ----------------------------------------


def _write_run(run: Path, protocol: str, folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], summary: bool = False) -> None:
    """A protocol run: fold k tests `identities` with true `ages` and predictions `expected`; with
    `summary`, the pooled results.json too (agecl-eval --aggregate, with its plots: seconds)."""
    start = 0
    for k, (identities, ages, expected) in enumerate(folds):
        n = len(ages)
        p = Predictions(ids=np.arange(start, start + n, dtype=np.int64), ages=ages.astype(np.int64),
                        expected=expected.astype(np.float32), std=np.ones(n, np.float32),
                        identities=identities.astype(np.int64))
        start += n
        write_fold_results(run / f"fold-{k}", p, metrics(p.expected, p.ages), protocol, k,
                           {"mean_age_baseline": 10.0}, n_folds=len(folds))
    if summary:
        aggregate(run)


def test_held_out_predictions_pool_every_fold(tmp_path):
    x, y = _shrunk(30)
    _write_run(tmp_path / "run", "inner-a", [(np.zeros(10), y[:10], x[:10]), (np.ones(20), y[10:], x[10:])])
    expected, ages, identities = held_out_predictions(tmp_path / "run")
    np.testing.assert_allclose(expected, x.astype(np.float32))
    np.testing.assert_array_equal(ages, y.astype(np.int64))
    np.testing.assert_array_equal(identities, [0] * 10 + [1] * 20)
    with pytest.raises(FileNotFoundError, match="nothing-here: no predictions.npz"):
        held_out_predictions(tmp_path / "nothing-here")


def test_calibrate_script_uses_the_other_halfs_fit(tmp_path):
    """Eight people: 0-3 half a, 4-7 half b. The select-a run (half b's people) shrinks ages by 0.5,
    the select-b run (half a's) by 0.8: each LOPO photo must be calibrated by its own half's fit,
    made on the other half's people."""
    shards = tmp_path / "shards"
    identities = np.repeat(np.arange(8), 25)
    rng = np.random.default_rng(2)
    ages = rng.integers(0, 70, len(identities)).astype(np.float64)
    half_a, half_b = [0, 1, 2, 3], [4, 5, 6, 7]
    for name, mine, people in (("inner-a", "a", half_a), ("inner-b", "b", half_b)):
        write_split(shards, name, np.zeros(len(identities), np.int16), {"protocol": name, f"half_{mine}": people})
    in_a = np.isin(identities, half_a)
    shrink = np.where(in_a, 0.8, 0.5)  # how the models shrink each person's ages
    predicted = 10 + shrink * (ages - 10) + rng.laplace(0, 1, len(ages))
    b_rows, a_rows = np.flatnonzero(~in_a), np.flatnonzero(in_a)
    _write_run(tmp_path / "select-a", "inner-a", [(identities[b_rows], ages[b_rows], predicted[b_rows])])
    _write_run(tmp_path / "select-b", "inner-b", [(identities[a_rows], ages[a_rows], predicted[a_rows])])
    _write_run(tmp_path / "lopo", "lopo", [(identities[identities == p], ages[identities == p], predicted[identities == p])
                                          for p in range(8)], summary=True)

    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--shards", str(shards),
                        "--fit-a", str(tmp_path / "select-a"), "--fit-b", str(tmp_path / "select-b"),
                        "--suffix", "cal", str(tmp_path / "lopo")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    stored = predicted.astype(np.float32)  # what predictions.npz holds
    fit_a = fit(stored[b_rows], ages[b_rows])  # from half b's people: the 0.5 shrink
    fit_b = fit(stored[a_rows], ages[a_rows])
    assert abs(fit_a.slope - 2.0) < 0.15 and abs(fit_b.slope - 1.25) < 0.1
    out = tmp_path / "lopo-cal"
    for p in range(8):
        with np.load(out / f"fold-{p}" / "predictions.npz") as z:
            want = (fit_a if p in half_a else fit_b).apply(stored[identities == p])
            np.testing.assert_allclose(z["expected"], want, rtol=1e-6)
            np.testing.assert_array_equal(z["ages"], ages[identities == p].astype(np.int64))
    summary = json.loads((out / "results.json").read_text())
    assert summary["pooled"]["n"] == len(ages)
    record = json.loads((out / "calibration.json").read_text())
    assert record["half_a"]["fitted_on"] == str(tmp_path / "select-a")
    assert abs(record["half_a"]["slope"] - fit_a.slope) < 1e-9
    assert f"-> {summary['pooled']['mae']:.2f}" in r.stdout

    # Other lines into the same folder: refused, not mixed with the folds already written.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--shards", str(shards),
                        "--fit-a", str(tmp_path / "select-a"), "--fit-b", str(tmp_path / "select-b"),
                        "--kind", "log", "--suffix", "cal", str(tmp_path / "lopo")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "written with other calibration lines" in r.stderr

    # Fitted on the LOPO run itself (every person's photos): each half's line still sees only the
    # other half's people, so here it is the same line as from the select runs.
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--shards", str(shards),
                        "--fit-a", str(tmp_path / "lopo"), "--fit-b", str(tmp_path / "lopo"),
                        "--suffix", "cross", str(tmp_path / "lopo")], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    for p in range(8):
        with np.load(out / f"fold-{p}" / "predictions.npz") as a, np.load(tmp_path / "lopo-cross" / f"fold-{p}" / "predictions.npz") as b:
            np.testing.assert_allclose(b["expected"], a["expected"], rtol=1e-6)
