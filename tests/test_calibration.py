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
from agecl.calibration import AgeCalibration, AgeStack, fit, fit_stack
from agecl.evaluate import Predictions, aggregate, load_predictions, metrics, write_fold_results
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


def _two_models(n: int, seed: int = 3):
    """True ages; a model shrunk towards 12 (slope 0.6, Laplace noise 2) and another biased by +10
    with a slope of 0.9 and noise 4: both carry information about the age, differently."""
    rng = np.random.default_rng(seed)
    ages = rng.integers(0, 71, n).astype(np.float64)
    f = 12 + 0.6 * (ages - 12) + rng.laplace(0, 2, n)
    z = 10 + 0.9 * ages + rng.laplace(0, 4, n)
    return np.column_stack([f, z]), ages


def test_stack_fit_is_the_least_absolute_deviation_plane():
    x, y = _two_models(300)
    s = fit_stack(x, y, ("fine-tuned", "zero-shot"))
    err = np.abs(y - s.intercept - x @ np.array(s.weights)).mean()
    # Brute force: both weights on a 0.01 grid, each pair with its best intercept (the median residual).
    best = np.inf
    for b in np.arange(0.0, 2.0, 0.01):
        r = y[None, :] - b * x[:, 0][None, :] - np.arange(-0.5, 1.0, 0.01)[:, None] * x[:, 1][None, :]
        best = min(best, float(np.abs(r - np.median(r, axis=1, keepdims=True)).mean(axis=1).min()))
    assert err <= best + 1e-6
    # Two models that err differently, stacked, beat the better one calibrated alone.
    alone = fit(x[:, 0], y)
    assert err < 0.95 * np.abs(alone.apply(x[:, 0]) - y).mean()
    # One input: the stack is the line `fit` finds.
    one = fit_stack(x[:, :1], y, ("fine-tuned",))
    assert abs(one.weights[0] - alone.slope) < 1e-4 and abs(one.intercept - alone.intercept) < 1e-3
    assert AgeStack.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert s.n == 300 and s.inputs == ("fine-tuned", "zero-shot")


def test_bad_stacks_are_refused():
    x, y = _two_models(20)
    with pytest.raises(ValueError, match="1 weights for 2 inputs"):
        AgeStack(inputs=("a", "b"), intercept=0.0, weights=(1.0,), n=1)
    with pytest.raises(ValueError, match="shape"):
        AgeStack(inputs=("a", "b"), intercept=0.0, weights=(1.0, 0.0), n=1).apply(x[:, :1])
    with pytest.raises(ValueError, match="no constant input"):
        fit_stack(np.column_stack([x[:, 0], np.full(20, 5.0)]), y, ("a", "b"))
    with pytest.raises(ValueError, match="19 predictions for 20 ages"):
        fit_stack(x[:19], y, ("a", "b"))
    with pytest.raises(ValueError, match="for 3 inputs"):
        fit_stack(x, y, ("a", "b", "c"))


# --- Run folders, as agecl-train and agecl-eval write them ----------------------------------------


def _write_run(run: Path, protocol: str, folds: list[tuple[np.ndarray, np.ndarray, np.ndarray]], summary: bool = False,
               ids: list[np.ndarray] | None = None) -> None:
    """A protocol run: fold k tests `identities` with true `ages` and predictions `expected`; with
    `summary`, the pooled results.json too (agecl-eval --aggregate, with its plots: seconds)."""
    start = 0
    for k, (identities, ages, expected) in enumerate(folds):
        n = len(ages)
        fold_ids = np.arange(start, start + n, dtype=np.int64) if ids is None else ids[k]
        p = Predictions(ids=fold_ids.astype(np.int64), ages=ages.astype(np.int64),
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
    held = load_predictions(tmp_path / "run")  # what calibrate.py fits on
    expected, ages, identities = held.expected, held.ages, held.identities
    np.testing.assert_allclose(expected, x.astype(np.float32))
    np.testing.assert_array_equal(ages, y.astype(np.int64))
    np.testing.assert_array_equal(identities, [0] * 10 + [1] * 20)
    with pytest.raises(FileNotFoundError, match="nothing-here: no predictions.npz"):
        load_predictions(tmp_path / "nothing-here")


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


def test_calibrate_script_stacks_with_a_second_model(tmp_path):
    """`--with`: each half's fit is a plane over the run's prediction and another model's for the same
    photos (matched by photo id, the other model's run ordered differently), fitted on the other
    half's people only; a photo the other model did not score is named, not guessed."""
    shards = tmp_path / "shards"
    identities = np.repeat(np.arange(8), 30)
    x, ages = _two_models(len(identities), seed=4)
    half_a, half_b = [0, 1, 2, 3], [4, 5, 6, 7]
    for name, mine, people in (("inner-a", "a", half_a), ("inner-b", "b", half_b)):
        write_split(shards, name, np.zeros(len(identities), np.int16), {"protocol": name, f"half_{mine}": people})
    ids = np.arange(len(identities)) + 1000  # photo ids, shared by every run
    in_a = np.isin(identities, half_a)
    b_rows, a_rows = np.flatnonzero(~in_a), np.flatnonzero(in_a)
    f = x[:, 0]
    _write_run(tmp_path / "select-a", "inner-a", [(identities[b_rows], ages[b_rows], f[b_rows])], ids=[ids[b_rows]])
    _write_run(tmp_path / "select-b", "inner-b", [(identities[a_rows], ages[a_rows], f[a_rows])], ids=[ids[a_rows]])
    _write_run(tmp_path / "lopo", "lopo", [(identities[identities == p], ages[identities == p], f[identities == p])
                                          for p in range(8)], summary=True, ids=[ids[identities == p] for p in range(8)])
    rev = np.arange(len(ids))[::-1]  # the zero-shot run lists the photos in another order
    _write_run(tmp_path / "zero-shot", "all", [(identities[rev], ages[rev], x[rev, 1])], ids=[ids[rev]])

    def calibrate(*extra):
        return subprocess.run([sys.executable, str(ROOT / "benchmarks" / "calibrate.py"), "--shards", str(shards),
                               "--fit-a", str(tmp_path / "select-a"), "--fit-b", str(tmp_path / "select-b"),
                               *extra, str(tmp_path / "lopo")], capture_output=True, text=True, cwd=ROOT)

    r = calibrate("--with", str(tmp_path / "zero-shot"), "--suffix", "stack")
    assert r.returncode == 0, r.stderr
    stored = x.astype(np.float32)  # what the predictions.npz files hold
    fit_a = fit_stack(stored[b_rows], ages[b_rows], ("a", "b"))  # half a's plane: half b's people
    fit_b = fit_stack(stored[a_rows], ages[a_rows], ("a", "b"))
    out = tmp_path / "lopo-stack"
    for p in range(8):
        rows = identities == p
        with np.load(out / f"fold-{p}" / "predictions.npz") as z:
            want = (fit_a if p in half_a else fit_b).apply(stored[rows])
            np.testing.assert_allclose(z["expected"], want, rtol=1e-5, atol=1e-4)
    record = json.loads((out / "calibration.json").read_text())
    assert record["kind"] == "stack" and record["with"] == str(tmp_path / "zero-shot")
    assert record["half_a"]["inputs"] == [str(tmp_path / "select-a"), str(tmp_path / "zero-shot")]
    np.testing.assert_allclose(record["half_b"]["weights"], fit_b.weights, rtol=1e-6)
    # The stack beats the line from the fine-tuned model alone, on the same halves.
    assert calibrate("--suffix", "line").returncode == 0
    mae = {s: json.loads((tmp_path / f"lopo-{s}" / "results.json").read_text())["pooled"]["mae"] for s in ("stack", "line")}
    assert mae["stack"] < 0.95 * mae["line"]

    # A second model that did not score every photo, and a stack asked in log years: refused.
    _write_run(tmp_path / "partial", "all", [(identities[:-5], ages[:-5], x[:-5, 1])], ids=[ids[:-5]])
    r = calibrate("--with", str(tmp_path / "partial"), "--suffix", "partial")
    assert r.returncode != 0 and "did not score" in r.stderr and str(tmp_path / "partial") in r.stderr
    r = calibrate("--with", str(tmp_path / "zero-shot"), "--kind", "log", "--suffix", "log")
    assert r.returncode != 0 and "--kind log" in r.stderr
