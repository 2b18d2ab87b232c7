"""Time to a given MAE: two (or more) training configurations, the same data, the same wall-clock
budget; test MAE against elapsed time for each, as JSON lines and one PNG.

    python benchmarks/time_to_mae.py --shards shards/fgnet --protocol kfold --fold 0 --budget 600 \
        --run "before=--precision fp32 --set loader.output_size=224" \
        --run "after=--set loss.supervise=triplet" --png time_to_mae.png [--common "--image-size 64 --device cpu"]

Each `--run NAME=FLAGS` is `agecl-train` flags (after `--common`, which both share) for one
configuration. The runs go one after another, each in its own process, so that neither inherits
the other's warm caches (compiled kernels, page cache aside). A run trains until its training
time passes `--budget` seconds (then it stops at the end of that epoch) or its epochs end; after
every epoch the model is evaluated on the test fold with the clock stopped. Elapsed time counts
everything from the run's start (shard set, loader and model set-up, training) except those
evaluations. The evaluations only draw the curve: nothing is chosen on them.

Output: one JSON line per run (its points: epoch, elapsed seconds, test MAE) and a summary line:
each run's final MAE, and for each run the elapsed time at which it first reached the first run's
final MAE (`time_to_first_final_mae_s`, None if it never did) and the ratio to the first run's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import commit, cpu_name  # noqa: E402


def _one_run(args: argparse.Namespace) -> int:
    """In the child process: train one configuration, writing its curve to --curve-out."""
    import torch
    from contextlib import nullcontext

    from agecl import evaluate as ev
    from agecl.loader import build_eval_loader
    from agecl.reader import ShardSet
    from agecl.train import choose_precision, config_from_args, get_args_parser, resolve, train

    t0 = time.perf_counter()
    cfg = config_from_args(get_args_parser().parse_args(shlex.split(args.flags)))
    shards = ShardSet(cfg.data.shards)
    points: list[dict] = []
    eval_time = 0.0
    state = {}

    def on_epoch_end(epoch: int, model) -> bool:
        nonlocal eval_time
        t_eval = time.perf_counter()
        if "loader" not in state:  # built lazily, with the run's resolved settings
            resolved = resolve(cfg, shards)
            test_ids = shards.split_ids(resolved.data.protocol, resolved.data.fold, "test")
            device = next(model.parameters()).device
            precision, _ = choose_precision(resolved.precision, device)
            state["loader"] = build_eval_loader(shards, test_ids, resolved.loader, device)
            state["ctx"] = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
        preds = ev.predict(model, state["loader"], state["ctx"], keep_features=False)
        mae = float(abs(preds.expected - preds.ages).mean())
        eval_time += time.perf_counter() - t_eval
        elapsed = time.perf_counter() - t0 - eval_time
        points.append({"epoch": epoch, "elapsed_s": round(elapsed, 2), "test_mae": round(mae, 4)})
        print(f"[{args.name}] epoch {epoch}: {elapsed:.0f} s, test MAE {mae:.3f}", file=sys.stderr, flush=True)
        return elapsed >= args.budget

    results = train(cfg, quiet=True, on_epoch_end=on_epoch_end)
    Path(args.curve_out).write_text(json.dumps({"points": points, "final_test_mae": results["test_mae"],
                                                "config": results["config"]}))
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True)
    p.add_argument("--protocol", default="kfold")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--budget", type=float, default=600, help="training seconds a run (default %(default)s)")
    p.add_argument("--epochs", type=int, default=1000, help="epochs a run at most (the budget usually ends it first)")
    p.add_argument("--common", default="--image-size 64 --device cpu", help="agecl-train flags every run shares")
    p.add_argument("--run", action="append", default=[], metavar="NAME=FLAGS", help="one configuration (repeat; 2 or more)")
    p.add_argument("--png", help="write the chart here")
    p.add_argument("--out", help="also append the JSON lines to this file")
    # The child's side.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--flags", help=argparse.SUPPRESS)
    p.add_argument("--curve-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return _one_run(args)
    if len(args.run) < 2 or any("=" not in r for r in args.run):
        raise SystemExit("give two or more --run NAME=FLAGS")

    lines = []
    with tempfile.TemporaryDirectory(prefix="time_to_mae-") as tmp:
        curves = {}
        for spec in args.run:
            name, flags = spec.split("=", 1)
            flags = (f"--shards {shlex.quote(args.shards)} --protocol {args.protocol} --fold {args.fold} "
                     f"--epochs {args.epochs} {args.common} {flags} --out {shlex.quote(str(Path(tmp) / name))}")
            curve_out = Path(tmp) / f"{name}.json"
            cmd = [sys.executable, __file__, "--child", "--name", name, "--flags", flags, "--curve-out", str(curve_out),
                   "--budget", str(args.budget), "--shards", args.shards]
            print(f"== {name}: agecl-train {flags}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True)
            curve = json.loads(curve_out.read_text())
            curves[name] = curve
            line = {"bench": "time_to_mae", "run": name, "flags": flags.split(" --out ")[0], **curve}
            line.pop("config")
            lines.append(line)
            print(json.dumps(line), flush=True)

    first = next(iter(curves))
    target = curves[first]["points"][-1]["test_mae"]
    reach = {}
    for name, c in curves.items():
        hit = next((pt["elapsed_s"] for pt in c["points"] if pt["test_mae"] <= target), None)
        reach[name] = hit
    summary = {
        "bench": "time_to_mae_summary",
        "shards": args.shards, "protocol": args.protocol, "fold": args.fold, "budget_s": args.budget,
        "target_mae": target, "target_from": first,
        "final_mae": {n: c["points"][-1]["test_mae"] for n, c in curves.items()},
        "time_to_first_final_mae_s": reach,
        "speedup_to_target": {n: (reach[first] / t if t else None) for n, t in reach.items()},
        "cpu": cpu_name(), "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    lines.append(summary)
    print(json.dumps(summary), flush=True)
    if args.out:
        with open(args.out, "a") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
    if args.png:
        from agecl.plots import plot_time_to_mae

        plot_time_to_mae({n: c["points"] for n, c in curves.items()}, args.png, title=f"{Path(args.shards).name}, "
                         f"{args.protocol} fold {args.fold}: test MAE against training time", target=target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
