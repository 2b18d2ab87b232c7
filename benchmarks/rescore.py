"""Score finished runs again with other test-time settings, no training: every checkpoint of each run
(one, or one a fold of --all-folds) goes through agecl-eval with the flags given, into a sibling
folder <run>-<suffix>, and a fold run is pooled as agecl-eval --aggregate pools it.

    python benchmarks/rescore.py --suffix flip --eval "--tta flip" runs/A runs/B
    python benchmarks/rescore.py --suffix flip-wise0.7 --eval "--tta flip --wise-ft 0.7" runs/A

One process for all (82 LOPO folds: a model load and a dozen faces each). Resumable: a checkpoint
already scored is skipped. Prints one line a run: its MAE as trained and as scored now.

A fold trained with the test-time setting asked for (`agecl-train --tta flip`, then `--eval "--tta
flip"` and nothing else) was scored so at the end of its training: its results.json and
predictions.npz are copied as they are, and it needs no checkpoint (a fold restored by
`keep_run.py --restore` has none).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import sys
from pathlib import Path

from agecl import atomic, evaluate


def scored_as_trained(fold: Path, asked: list[str]) -> bool:
    """Whether `asked` (the --eval flags) is only `--tta MODE` and the fold was tested so when trained."""
    if len(asked) != 2 or asked[0] != "--tta":
        return False
    trained = json.loads((fold / "results.json").read_text()).get("config", {}).get("test_tta", "none")
    return trained == asked[1] and (fold / evaluate.PREDICTIONS_FILE).is_file()


def score(checkpoint: Path, out: Path, flags: list[str], asked: list[str] = ()) -> None:
    if (out / "results.json").is_file():  # a killed job resumes: scored checkpoints are skipped
        return
    if asked and scored_as_trained(checkpoint.parent, list(asked)):  # asked: only for a fold of a run
        for name in (evaluate.PREDICTIONS_FILE, "results.json"):  # results.json last: it marks the fold scored
            atomic.write_bytes(out / name, (checkpoint.parent / name).read_bytes())
        return
    said = io.StringIO()  # agecl-eval's report, shown only for a failure: a row is 82 of them
    with contextlib.redirect_stdout(said):
        rc = evaluate.main(["--checkpoint", str(checkpoint), *flags, "--out", str(out)])
    if rc != 0:
        sys.exit(f"{checkpoint}: agecl-eval {' '.join(flags)} failed (exit {rc}):\n{said.getvalue()}")


def rescore(run: Path, suffix: str, flags: list[str], asked: list[str] = ()) -> tuple[float, float] | None:
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
        score(r.parent / "checkpoint.pt", to / r.parent.name, flags, asked)
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
    asked = shlex.split(args.eval)
    flags = ["--workers", "2", "--device", "cpu", *asked]  # later flags win
    for run in args.runs:
        maes = rescore(run, args.suffix, flags, asked)
        if maes is not None:
            print(f"{run}: MAE {maes[0]:.2f}; {args.suffix} {maes[1]:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
