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


def calibrate_run(run: Path, to: Path, fits: dict[str, calibration.AgeCalibration], people: dict[str, np.ndarray]) -> None:
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
            expected[mine] = cal.apply(p.expected[mine])
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
    p.add_argument("--suffix", required=True, help="the calibrated run's folder is <run>-<suffix>")
    args = p.parse_args(argv)

    people = halves(args.shards)
    fits = {}
    for h, src in (("a", args.fit_a), ("b", args.fit_b)):
        expected, ages, identities = calibration.held_out_predictions(src)
        other = ~np.isin(identities, people[h])  # the other half's people only
        if not other.any():
            sys.exit(f"{src}: no photo of a person outside half {h}: nothing to fit half {h}'s calibration on")
        expected, ages = expected[other], ages[other]
        fits[h] = calibration.fit(expected, ages, args.kind)
        c = fits[h]
        print(f"half {h}: {args.kind} calibration from {src} ({c.n} predictions): intercept {c.intercept:.3f}, "
              f"slope {c.slope:.3f}; MAE there {np.abs(expected - ages).mean():.2f} -> "
              f"{np.abs(c.apply(expected) - ages).mean():.2f}")
    for run in args.runs:
        to = Path(f"{run}-{args.suffix}")
        record = json.loads(json.dumps(
            {"kind": args.kind, "halves_from": str(args.shards),
             **{f"half_{h}": {**c.to_dict(), "fitted_on": str(src)} for (h, c), src in zip(fits.items(), (args.fit_a, args.fit_b))}}))
        if (to / "calibration.json").is_file() and json.loads((to / "calibration.json").read_text()) != record:
            sys.exit(f"{to}: written with other calibration lines ({to / 'calibration.json'}); remove it or choose another --suffix")
        write_json(to / "calibration.json", record)  # first: a killed run's folds are known to be these lines'
        calibrate_run(run, to, fits, people)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluate.main(["--aggregate", str(to)])
        was, now = (json.loads((d / evaluate.RESULTS_FILE).read_text()) for d in (run, to))
        print(f"{run}: MAE {was['pooled']['mae']:.2f} -> {now['pooled']['mae']:.2f} ({to})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
