"""The ensemble of finished runs that scored the same faces: each face's predicted age averaged.

    python benchmarks/average_runs.py RUN RUN [RUN ...] --out DIR

Each RUN's predictions (its folds' `predictions.npz` pooled, or its own) are matched by sample id
and averaged with equal weights (agecl.evaluate.average_predictions). DIR gets a `results.json` and
a `predictions.npz` as a one-fold run's, so `compare_runs.py` and `agecl-eval` read it as any run;
the results name the runs averaged. Prints one JSON object: each run's MAE, the ensemble's, and the
correlation of the runs' signed errors (runs that err together gain little from averaging). Exit 2
with the folder and the reason when a run has no predictions or the runs scored different faces.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders scored on the same faces (two or more)")
    p.add_argument("--out", type=Path, required=True, help="folder for the ensemble's results.json and predictions.npz")
    args = p.parse_args(argv)
    if len(args.runs) < 2:
        p.error("two or more runs are needed")
    try:
        preds = evaluate.align_predictions([evaluate.load_predictions(run) for run in args.runs])
        ensemble = evaluate.average_predictions(preds)
    except (FileNotFoundError, ValueError) as e:
        print(f"average_runs: {', '.join(map(str, args.runs))}: {e}", file=sys.stderr)
        return 2
    m = evaluate.metrics(ensemble.expected, ensemble.ages)
    evaluate.write_fold_results(args.out, ensemble, m, "ensemble", 0, {"averaged_runs": [str(r) for r in args.runs]})
    errors = [run.expected.astype(np.float64) - run.ages for run in preds]  # aligned: row k is one face in all
    summary = {
        "out": str(args.out),
        "runs": [{"run": str(r), "mae": float(np.abs(e).mean())} for r, e in zip(args.runs, errors)],
        "mae": m["mae"],
        "cs5": m["cs5"],
        "bias": m["bias"],
        "n": m["n"],
        "error_correlation": np.corrcoef(np.stack(errors)).round(4).tolist(),
    }
    print(json.dumps(summary), flush=True)
    each = ", ".join(f"{x['mae']:.2f}" for x in summary["runs"])
    print(f"{args.out}: MAE {m['mae']:.2f} averaging {len(preds)} runs ({each}), {m['n']} faces", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
