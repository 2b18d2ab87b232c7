"""`agecl-demo`: the whole system on a laptop CPU in a few minutes, with nothing to download.

1. Builds the generated face dataset (agecl.synthetic, via agecl.build) into shards/synthetic,
   unless a complete set is there already.
2. Trains the paper's model on it (agecl.train: ResNet-18, triplets, Eq. 7's loss), at a small
   input size so that a 2-core CPU finishes in minutes; every setting is printed.
3. Prints the test MAE against the MAE of always predicting the mean training age.

Running it again reuses the shards and the run folder: a finished run is re-evaluated (seconds),
an interrupted one continues from its last epoch. Use --out for a fresh run.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

from agecl import format as fmt
from agecl.config import TrainConfig

DEMO_SHARDS = "shards/synthetic"
DEMO_OUT = "runs/demo"
# Chosen on a 2-core CPU (see `demo_config`): the build takes under a minute, the training a few.
DEMO_SAMPLES = 1200
DEMO_IMAGE_SIZE = 64  # network input, pixels: the 224 crop resized (the whole face, coarser)
DEMO_EPOCHS = 4
DEMO_BATCH = 32  # triplets: 96 images a step


def demo_config(
    shards: str,
    out: str,
    image_size: int = DEMO_IMAGE_SIZE,
    epochs: int = DEMO_EPOCHS,
    batch_size: int = DEMO_BATCH,
    device: str = "auto",
    loader: str = "dali",
    workers: int = 2,
) -> TrainConfig:
    """The demo's TrainConfig: the paper's model and loss (default weights, Adam lr 0.001), at a
    small input size, few epochs. The loader delivers `image_size` images drawn from the paper's
    224 crop. Two departures from the paper's schedule suit a run of a few epochs: the learning
    rate decays to 0 over the run (cosine), so the last epoch does not end mid-swing, and the age
    terms supervise every image of a triplet (`loss.supervise`), whose forward passes are paid for
    anyway (both measured in benchmarks/RESULTS.md)."""
    cfg = TrainConfig()
    cfg.data.shards = shards
    cfg.out = out
    cfg.epochs = epochs
    cfg.lr_schedule = "cosine"
    cfg.loss.supervise = "triplet"
    cfg.model.input_size = image_size
    cfg.loader.batch_size = batch_size
    cfg.loader.loader = loader
    cfg.loader.workers = workers
    cfg.device = device
    cfg.log_every = 10
    return cfg


def ensure_shards(path: Path | str, samples: int, workers: int = 2, quiet: bool = False) -> dict:
    """Build `samples` generated faces into `path` unless a complete shard set is there; return its manifest."""
    path = Path(path)
    if (path / fmt.MANIFEST_FILE).is_file():
        manifest = fmt.load_manifest(path)
        print(f"{path}: complete shard set ({manifest['samples']} samples); not rebuilding", flush=True)
        return manifest
    from agecl.build import main as build_main

    print(f"building {samples} generated faces into {path} ...", flush=True)
    argv = ["--synthetic", str(samples), "--out", str(path), "--workers", str(max(1, workers))] + (["--quiet"] if quiet else [])
    if build_main(argv) != 0:
        raise RuntimeError(f"building the synthetic shard set in {path} failed (see the message above)")
    return fmt.load_manifest(path)


def run_demo(
    shards: str = DEMO_SHARDS,
    out: str = DEMO_OUT,
    samples: int = DEMO_SAMPLES,
    image_size: int = DEMO_IMAGE_SIZE,
    epochs: int = DEMO_EPOCHS,
    batch_size: int = DEMO_BATCH,
    device: str = "auto",
    loader: str = "dali",
    workers: int = 2,
    quiet: bool = False,
) -> dict:
    """Build (if needed), train, evaluate. Returns the run's results.json dict plus "wall_time_s"."""
    from agecl.train import train

    t0 = time.time()
    ensure_shards(shards, samples, workers=workers, quiet=quiet)
    cfg = demo_config(shards, out, image_size, epochs, batch_size, device, loader, workers)
    print(
        f"demo: ResNet-18 from scratch, {image_size} px input, {epochs} epochs, {batch_size} triplets a batch, "
        f"Adam lr {cfg.lr} ({cfg.lr_schedule}), loss weights {cfg.loss}",
        flush=True,
    )
    results = train(cfg, resume=True, quiet=quiet)
    wall = time.time() - t0
    mae, base = results["test_mae"], results["mean_age_baseline"]
    print(
        f"\ndemo: test MAE {mae:.2f} years, CS(5) {100 * results['test_cs5']:.1f}% on {results['n_test']} test faces; "
        f"always guessing the mean training age gives MAE {base:.2f} ({100 * (1 - mae / base):.0f}% lower). "
        f"Wall time {wall:.0f} s. Run folder: {out} (training curves: {Path(out) / 'curves.png'})",
        flush=True,
    )
    return {**results, "wall_time_s": wall}


def main(argv: Sequence[str] | None = None) -> int:
    """`agecl-demo`: build the synthetic shards if needed, train on them, print the test MAE."""
    p = argparse.ArgumentParser(prog="agecl-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", default=DEMO_SHARDS, help="where the generated shard set lives (default %(default)s)")
    p.add_argument("--samples", type=int, default=DEMO_SAMPLES, help="faces to generate (default %(default)s)")
    p.add_argument("--out", default=DEMO_OUT, help="run folder (default %(default)s)")
    p.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE, help="network input side, pixels (default %(default)s)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=DEMO_BATCH, help="triplets a batch (default %(default)s)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda (default %(default)s)")
    p.add_argument("--loader", choices=("dali", "torch"), default="dali", help="(default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="loader and builder threads (default %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(argv)
    from agecl.checkpoint import CheckpointError
    from agecl.train import TrainError

    try:
        run_demo(a.shards, a.out, a.samples, a.image_size, a.epochs, a.batch_size, a.device, a.loader, a.workers, a.quiet)
    except (CheckpointError, TrainError, fmt.FormatError, RuntimeError) as e:
        print(f"agecl-demo: error: {e}\n(a run folder from other settings? pass --out for a fresh one)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
