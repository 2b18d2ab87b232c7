"""Runs compared with a base run on the same test faces: MAE difference with a 95 % interval.

    python benchmarks/compare_runs.py BASE RUN [RUN ...] [--resamples 2000] [--seed 0]

Each RUN's predictions (its folds' `predictions.npz` pooled, or its own) are matched with BASE's by
sample id, and the difference of their MAEs (RUN - BASE: negative means RUN is better) is given with
a bootstrap interval that resamples people, not faces (agecl.evaluate.paired_difference). A recipe
choice whose interval holds 0 is not one the test set resolved. Prints one JSON object a RUN, a line
each, then a readable line on standard error. Exit 2 with the folder and the reason when a run has no
predictions or the two runs scored different sets.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agecl import evaluate  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", type=Path, help="the run the others are measured against")
    p.add_argument("runs", nargs="+", type=Path, help="run folders scored on the same faces")
    p.add_argument("--resamples", type=int, default=2000, help="bootstrap resamples of the people (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.resamples < 100:
        p.error(f"--resamples {args.resamples}: at least 100 are needed for a 95 % interval")
    try:
        base = evaluate.load_predictions(args.base)
        for run in args.runs:
            try:
                d = evaluate.paired_difference(base, evaluate.load_predictions(run), resamples=args.resamples, seed=args.seed)
            except ValueError as e:
                raise ValueError(f"{run} against {args.base}: {e}") from None
            print(json.dumps({"base": str(args.base), "run": str(run), **d}), flush=True)
            print(f"{run}: MAE {d['mae_other']:.2f} against {d['mae_base']:.2f}, difference {d['difference']:+.2f} "
                  f"[{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}] over {d['people']} people, {d['n']} faces; "
                  f"worse on {100 * d['share_other_worse']:.0f} % of faces, better on {100 * d['share_other_better']:.0f} %",
                  file=sys.stderr)
    except (FileNotFoundError, ValueError) as e:
        print(f"compare_runs: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
