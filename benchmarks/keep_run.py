"""Finished runs' test predictions, pooled over their folds, kept where git can hold them.

    python benchmarks/keep_run.py RUN [RUN ...] --into benchmarks/kept

`runs/` holds the checkpoints (about 130 MB a fold) and has not outlived its machine: the per-face
predictions of earlier LOPO rows were lost with it, and with them every later face-by-face
comparison or average that needed them. The predictions themselves are small (about 30 KB for
FG-NET's 1,002 faces). Each RUN becomes INTO/<RUN's folder name>/ with a `predictions.npz` (every
test photo: sample id, true age, expected age, spread, person) and a `results.json` (the pooled
metrics, the run's own pooled summary where it has one, the first fold's configuration, and where it
came from), a one-fold run that `compare_runs.py`, `average_runs.py` and `calibrate.py --with` read
as they read the run. Exit 2 naming the run when it has no predictions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl import evaluate  # noqa: E402


def keep(run: Path, into: Path) -> dict:
    preds = evaluate.load_predictions(run)
    first = sorted(run.glob(f"{evaluate.FOLD_DIR_GLOB}/{evaluate.RESULTS_FILE}")) or [run / evaluate.RESULTS_FILE]
    fold = json.loads(first[0].read_text()) if first[0].is_file() else {}
    summary_file = run / evaluate.RESULTS_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    extra = {"kept_from": str(run), "folds_pooled": len(first), "pooled": summary.get("pooled"),
             "status": summary.get("status"), "config": fold.get("config"), "tta": fold.get("tta", fold.get("test_tta"))}
    m = evaluate.metrics(preds.expected, preds.ages)
    return evaluate.write_fold_results(into / run.name, preds, m, fold.get("protocol", "kept"), 0, extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="finished run folders")
    p.add_argument("--into", type=Path, required=True, help="the folder that gets one sub-folder a run")
    args = p.parse_args(argv)
    for run in args.runs:
        try:
            r = keep(run, args.into)
        except FileNotFoundError as e:
            print(f"keep_run: {e}", file=sys.stderr)
            return 2
        print(f"{run} -> {args.into / run.name}: {r['n_test']} faces, MAE {r['test_mae']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
