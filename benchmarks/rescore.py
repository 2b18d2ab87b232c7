"""Score finished runs again with other test-time settings, no training: every checkpoint of each run
(one, or one a fold of --all-folds) goes through agecl-eval with the flags given, into a sibling
folder <run>-<suffix>, and a fold run is pooled as agecl-eval --aggregate pools it.

    python benchmarks/rescore.py --suffix flip --eval "--tta flip" runs/A runs/B
    python benchmarks/rescore.py --suffix flip-wise0.7 --eval "--tta flip --wise-ft 0.7" runs/A

One process for all (82 LOPO folds: a model load and a dozen faces each). Resumable: a checkpoint
already scored is skipped. Prints one line a run: its MAE as trained and as scored now.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

from agecl import evaluate


def score(checkpoint: Path, out: Path, flags: list[str]) -> None:
    if (out / "results.json").is_file():  # a killed job resumes: scored checkpoints are skipped
        return
    said = io.StringIO()  # agecl-eval's report, shown only for a failure: a row is 82 of them
    with contextlib.redirect_stdout(said):
        rc = evaluate.main(["--checkpoint", str(checkpoint), *flags, "--out", str(out)])
    if rc != 0:
        sys.exit(f"{checkpoint}: agecl-eval {' '.join(flags)} failed (exit {rc}):\n{said.getvalue()}")


def rescore(run: Path, suffix: str, flags: list[str]) -> tuple[float, float] | None:
    """(MAE as trained, MAE rescored) of a finished run; None for a run not there or not finished."""
    to = Path(f"{run}-{suffix}")
    folds = sorted(run.glob("fold-*/results.json"))
    if not folds and (run / "results.json").is_file():  # one run with a test fold (AAF val)
        score(run / "checkpoint.pt", to, flags)
        return tuple(json.loads((d / "results.json").read_text())["test_mae"] for d in (run, to))
    if not folds:
        print(f"{run}: not run")
        return None
    for r in folds:
        score(r.parent / "checkpoint.pt", to / r.parent.name, flags)
    if not (run / "results.json").is_file():
        print(f"{run}: not finished ({len(folds)} folds): scored what is there")
        return None
    with contextlib.redirect_stdout(io.StringIO()):
        evaluate.main(["--aggregate", str(to)])
    return tuple(json.loads((d / "results.json").read_text())["pooled"]["mae"] for d in (run, to))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (agecl-train --out)")
    p.add_argument("--suffix", required=True, help="the rescored run's folder is <run>-<suffix>")
    p.add_argument("--eval", default="", help="agecl-eval flags, one string (e.g. \"--tta flip --wise-ft 0.7\")")
    args = p.parse_args(argv)
    flags = ["--workers", "2", "--device", "cpu", *shlex.split(args.eval)]  # later flags win
    for run in args.runs:
        maes = rescore(run, args.suffix, flags)
        if maes is not None:
            print(f"{run}: MAE {maes[0]:.2f}; {args.suffix} {maes[1]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
