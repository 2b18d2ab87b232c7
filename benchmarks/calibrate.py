"""FG-NET's runs with each prediction calibrated (agecl.calibration) by a line fitted on the other
half's people: no training, and no test person's photo in the fit that calibrates it.

    python benchmarks/calibrate.py --shards shards/fgnet-reflect --fit-a RUN_A --fit-b RUN_B \
        --kind linear --suffix cal-linear RUN [RUN ...]

The select stage of aaf_to_fgnet.sh cuts FG-NET's people in two halves: RUN_A (the select-a run) is
fine-tuned and tested on half b's people only, for the choices made for half a's LOPO folds, and
RUN_B the other way round. RUN_A's held-out predictions fit half a's calibration, RUN_B's fit half
b's; each photo of each RUN given is then calibrated by its person's half's. Half a's line is fitted
on half b's people's photos only, whatever RUN_A holds (and the other way round), so that no photo
is calibrated by a line fitted on its own person. The halves come from the inner-a / inner-b
splits' records (`half_a`, `half_b`). Each RUN (a protocol run with fold-* folders) is written to
<RUN>-<suffix> (the folds' results.json and predictions.npz, `calibration.json`, and the pooled
summary, as agecl-eval --aggregate writes it). Prints one line a run: its MAE as it was and as
calibrated. Resumable: a fold already written is skipped, and a folder written with other lines is
refused rather than mixed.

    python benchmarks/calibrate.py ... --with runs/aaf-reflect-all-e12/eval-fgnet-reflect-all-flip ...

`--with OTHER` stacks: OTHER holds another model's predictions of the same photos (matched by photo
id; above, the AAF model zero-shot on every FG-NET photo, which never saw any of them), and each
half's fit becomes the least-absolute-deviation plane age = a + b x predicted + c x OTHER's
(agecl.calibration.fit_stack), fitted and applied with the same halves as a line.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl import calibration, evaluate  # noqa: E402
from agecl import format as fmt  # noqa: E402
from agecl.atomic import write_json  # noqa: E402


def halves(shards: Path) -> dict[str, np.ndarray]:
    """{"a": people of half a, "b": people of half b} (identity positions), from the inner splits' records."""
    out = {}
    for h in "ab":
        path = fmt.split_path(shards, f"inner-{h}").with_suffix(".json")
        try:
            out[h] = np.array(json.loads(path.read_text())[f"half_{h}"], np.int64)
        except (OSError, ValueError, KeyError) as e:
            sys.exit(f"{path}: no record of half {h}'s people ({type(e).__name__}: {e}); run aaf_to_fgnet.sh select first")
    if np.intersect1d(out["a"], out["b"]).size:
        sys.exit(f"{shards}: halves a and b share people: the inner splits do not come from one cut")
    return out


Fit = calibration.AgeCalibration | calibration.AgeStack


class SecondOpinion:
    """Another model's predicted age for each photo id (`--with`), as the second column of a stack."""

    def __init__(self, run: Path):
        p = evaluate.load_predictions(run)
        self.run, self.by_id = run, dict(zip(p.ids.tolist(), p.expected.tolist()))

    def columns(self, expected: np.ndarray, ids: np.ndarray, where: Path) -> np.ndarray:
        """(N, 2): the run's predictions and this model's for the same photos."""
        missing = [i for i in ids.tolist() if i not in self.by_id]
        if missing:
            sys.exit(f"{where}: {len(missing)} photo(s) (ids {missing[:3]}...) that {self.run} did not score")
        return np.column_stack([expected, [self.by_id[i] for i in ids.tolist()]])


def _apply(fit: Fit, expected: np.ndarray, ids: np.ndarray, second: SecondOpinion | None, where: Path) -> np.ndarray:
    if isinstance(fit, calibration.AgeStack):
        return fit.apply(second.columns(expected, ids, where))
    return fit.apply(expected)


def calibrate_run(run: Path, to: Path, fits: dict[str, Fit], people: dict[str, np.ndarray],
                  second: SecondOpinion | None = None) -> None:
    folds = sorted(run.glob("fold-*/results.json"))
    if not folds:
        sys.exit(f"{run}: no finished fold (fold-*/results.json)")
    for r in folds:
        out = to / r.parent.name
        if (out / evaluate.RESULTS_FILE).is_file():
            continue
        with np.load(r.parent / evaluate.PREDICTIONS_FILE) as z:
            p = evaluate.Predictions(**{k: z[k] for k in ("ids", "ages", "expected", "std", "identities")})
        if not np.all(np.isin(p.identities, np.concatenate(list(people.values())))):
            sys.exit(f"{r.parent}: a test photo of a person in neither half")
        expected = p.expected.copy()
        for h, cal in fits.items():
            mine = np.isin(p.identities, people[h])
            expected[mine] = _apply(cal, p.expected[mine], p.ids[mine], second, r.parent)
        p.expected = expected
        res = json.loads(r.read_text())
        extra = {k: v for k, v in res.items() if k in ("mean_age_baseline", "epochs", "config", "checkpoint", "test_tta")}
        extra["calibrated_from"] = str(r.parent)
        evaluate.write_fold_results(out, p, evaluate.metrics(p.expected, p.ages), res["protocol"], int(res["fold"]),
                                    extra, n_folds=res.get("folds"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="protocol run folders whose predictions are calibrated")
    p.add_argument("--shards", type=Path, required=True, help="the FG-NET shard set (its inner-a / inner-b splits)")
    p.add_argument("--fit-a", type=Path, required=True, help="held-out predictions on half b's people: half a's fit")
    p.add_argument("--fit-b", type=Path, required=True, help="held-out predictions on half a's people: half b's fit")
    p.add_argument("--kind", choices=calibration.KINDS, default="linear")
    p.add_argument("--with", dest="second", type=Path, metavar="OTHER",
                   help="stack with another model's predictions of the same photos (a run folder, matched by "
                        "photo id): age = a + b x predicted + c x OTHER's; --kind linear only")
    p.add_argument("--suffix", required=True, help="the calibrated run's folder is <run>-<suffix>")
    args = p.parse_args(argv)
    if args.second and args.kind != "linear":
        p.error(f"--with stacks with a plane in years: --kind {args.kind} does not apply")
    second = SecondOpinion(args.second) if args.second else None

    people = halves(args.shards)
    fits = {}
    for h, src in (("a", args.fit_a), ("b", args.fit_b)):
        held = evaluate.load_predictions(src)
        other = ~np.isin(held.identities, people[h])  # the other half's people only
        if not other.any():
            sys.exit(f"{src}: no photo of a person outside half {h}: nothing to fit half {h}'s calibration on")
        expected, ages, ids = held.expected[other], held.ages[other], held.ids[other]
        if second:
            c = fits[h] = calibration.fit_stack(second.columns(expected, ids, src), ages, (str(src), str(args.second)))
            line = f"stack from {src} ({c.n} predictions): {c.intercept:.3f} + " + " + ".join(
                f"{w:.3f} x {name}" for w, name in zip(c.weights, ("predicted", "other")))
        else:
            c = fits[h] = calibration.fit(expected, ages, args.kind)
            line = (f"{args.kind} calibration from {src} ({c.n} predictions): intercept {c.intercept:.3f}, "
                    f"slope {c.slope:.3f}")
        print(f"half {h}: {line}; MAE there {np.abs(expected - ages).mean():.2f} -> "
              f"{np.abs(_apply(c, expected, ids, second, src) - ages).mean():.2f}")
    for run in args.runs:
        to = Path(f"{run}-{args.suffix}")
        record = json.loads(json.dumps(
            {"kind": "stack" if second else args.kind, "halves_from": str(args.shards),
             **({"with": str(args.second)} if second else {}),
             **{f"half_{h}": {**c.to_dict(), "fitted_on": str(src)} for (h, c), src in zip(fits.items(), (args.fit_a, args.fit_b))}}))
        if (to / "calibration.json").is_file() and json.loads((to / "calibration.json").read_text()) != record:
            sys.exit(f"{to}: written with other calibration lines ({to / 'calibration.json'}); remove it or choose another --suffix")
        write_json(to / "calibration.json", record)  # first: a killed run's folds are known to be these lines'
        calibrate_run(run, to, fits, people, second)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluate.main(["--aggregate", str(to)])
        was, now = (json.loads((d / evaluate.RESULTS_FILE).read_text()) for d in (run, to))
        print(f"{run}: MAE {was['pooled']['mae']:.2f} -> {now['pooled']['mae']:.2f} ({to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
