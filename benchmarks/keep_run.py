"""Finished runs' test predictions, pooled over their folds, kept where git can hold them.

    python benchmarks/keep_run.py RUN [RUN ...] --into benchmarks/kept
    python benchmarks/keep_run.py --folds RUN [RUN ...] --into benchmarks/kept/folds
    python benchmarks/keep_run.py --restore RUN [RUN ...] --into benchmarks/kept/folds

`runs/` holds the checkpoints (about 130 MB a fold) and has not outlived its machine: the per-face
predictions of earlier LOPO rows were lost with it, and with them every later face-by-face
comparison or average that needed them. The predictions themselves are small (about 30 KB for
FG-NET's 1,002 faces). Each RUN becomes INTO/<RUN's folder name>/ with a `predictions.npz` (every
test photo: sample id, true age, expected age, spread, person) and a `results.json` (the pooled
metrics, the run's own pooled summary where it has one, the first fold's configuration and machine, and where it
came from), a one-fold run that `compare_runs.py`, `average_runs.py` and `calibrate.py --with` read
as they read the run. Exit 2 naming the run when it has no predictions.

`--folds` keeps an unfinished row's progress instead: each finished fold's `results.json` and
`predictions.npz`, byte for byte, in INTO/<RUN's folder name>/fold-<k>/ (about 6 KB a fold). A LOPO
row on a slow CPU takes longer than a session, and a machine that loses `runs/` would otherwise
lose its finished folds too. `--restore` puts them back: each kept fold that RUN lacks is copied
into RUN/fold-<k>/, which `agecl-train --all-folds` then skips as finished (a fold folder holding a
checkpoint of unfinished training is left alone: that training resumes). A restored fold has no
checkpoint: its predictions are final, so a row meant to be scored with the mirror trains with
`--tta flip` (rescore.py then copies, rather than rescores, such a fold).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl import atomic, evaluate  # noqa: E402

FOLD_FILES = (evaluate.PREDICTIONS_FILE, evaluate.RESULTS_FILE)  # results.json last: it marks a fold finished


def keep(run: Path, into: Path) -> dict:
    preds = evaluate.load_predictions(run)
    first = sorted(run.glob(f"{evaluate.FOLD_DIR_GLOB}/{evaluate.RESULTS_FILE}")) or [run / evaluate.RESULTS_FILE]
    fold = json.loads(first[0].read_text()) if first[0].is_file() else {}
    summary_file = run / evaluate.RESULTS_FILE
    summary = json.loads(summary_file.read_text()) if summary_file.is_file() else {}
    extra = {"kept_from": str(run), "folds_pooled": len(first), "pooled": summary.get("pooled"),
             "status": summary.get("status"), "config_differences": summary.get("config_differences"),
             "config": fold.get("config"), "machine": fold.get("machine"), "tta": fold.get("tta", fold.get("test_tta"))}
    m = evaluate.metrics(preds.expected, preds.ages)
    return evaluate.write_fold_results(into / run.name, preds, m, fold.get("protocol", "kept"), 0, extra)


def finished_folds(run: Path) -> list[Path]:
    """The fold folders of `run` that hold both a results.json and a predictions.npz."""
    return sorted((d for d in run.glob(evaluate.FOLD_DIR_GLOB) if all((d / f).is_file() for f in FOLD_FILES)),
                  key=lambda d: int(d.name.split("-")[1]))


def copy_folds(source: Path, target: Path, restoring: bool = False) -> tuple[int, list[str]]:
    """Copy each finished fold of `source` into `target`/fold-<k>/ unless `target` has it already with
    the same bytes. A finished fold already in `target` is never replaced; when `restoring`, neither
    is a fold folder with a checkpoint of unfinished training. Returns (folds copied, the reasons for
    those left alone)."""
    copied, left = 0, []
    for fold in finished_folds(source):
        to = target / fold.name
        if all((to / f).is_file() and (to / f).read_bytes() == (fold / f).read_bytes() for f in FOLD_FILES):
            continue
        if (to / evaluate.RESULTS_FILE).is_file():
            left.append(f"{to}: a different finished fold is there; not replaced")
            continue
        if restoring and (to / "checkpoint.pt").is_file():
            left.append(f"{to}: a checkpoint of unfinished training is there; not restored (its training resumes)")
            continue
        for f in FOLD_FILES:
            atomic.write_bytes(to / f, (fold / f).read_bytes())
        copied += 1
    return copied, left


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders")
    p.add_argument("--into", type=Path, required=True, help="the folder that gets one sub-folder a run")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--folds", action="store_true", help="keep each finished fold of an unfinished (or finished) run")
    mode.add_argument("--restore", action="store_true", help="copy the kept folds back into each run where it lacks them")
    args = p.parse_args(argv)
    for run in args.runs:
        if args.folds or args.restore:
            source, target = (args.into / run.name, run) if args.restore else (run, args.into / run.name)
            n, left = copy_folds(source, target, restoring=args.restore)
            for why in left:
                print(f"keep_run: {why}", file=sys.stderr)
            print(f"{source} -> {target}: {n} folds copied, {len(finished_folds(target))} finished there")
            continue
        try:
            r = keep(run, args.into)
        except FileNotFoundError as e:
            print(f"keep_run: {e}", file=sys.stderr)
            return 2
        print(f"{run} -> {args.into / run.name}: {r['n_test']} faces, MAE {r['test_mae']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
