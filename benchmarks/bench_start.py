"""Training start at scale: open a shard set of N samples and draw one epoch of triplets.

    python benchmarks/bench_start.py --samples 1000000

Writes a shard set whose index, identities, splits and manifest are those of the generated
dataset of N faces (`agecl.synthetic` labels: N/10 people, ages 0-79, in the builder's order and
written by `agecl.shards`), but whose JPEGs are 4-byte stand-ins (FF D8 FF D9), so that a million
samples take 8 MB of shards instead of 26 GB. Then, in a fresh process (the JIT cache loaded
first, not timed), times what `agecl-train` does before its first step:

    open      ShardSet(root): manifest, identities, index columns, shard checks, JPEG markers
    split     split_ids(kfold, fold 0, train)
    tables    the loader's TripletSampler tables over the training ids
    epoch     one epoch of triplets, cut into batches of 64 as the loader does

One JSON line; `peak_rss_mb` is that process's ru_maxrss. The stand-in JPEGs make the marker check
touch far fewer pages than a real set's (two pages a sample there): see `open_noverify_s`.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from provenance import commit, cpu_name  # noqa: E402

STAND_IN = b"\xff\xd8\xff\xd9"  # the smallest thing the reader's JPEG check accepts
STRIDE = 8  # bytes a sample in a stand-in shard


def make_set(root: Path, n: int, shard_size: int, seed: int) -> None:
    from agecl import format as fmt
    from agecl import shards, splits, synthetic

    ages, who = synthetic.synthetic_labels(n, seed)
    names = [synthetic.identity_name(p) for p in range(int(who.max()) + 1)]
    rank = np.empty(len(names), np.int64)
    rank[sorted(range(len(names)), key=names.__getitem__)] = np.arange(len(names))
    order = np.lexsort((np.arange(n), rank[who], ages))  # (age, identity, source): sources grow with i
    index = np.zeros(n, fmt.INDEX_DTYPE)
    index["shard"] = np.arange(n) // shard_size
    index["offset"] = (np.arange(n) % shard_size) * STRIDE
    index["size"] = len(STAND_IN)
    index["age"] = ages[order]
    index["identity"] = rank[who[order]]
    root.mkdir(parents=True)
    n_shards = -(-n // shard_size)
    block = (STAND_IN + b"\0" * (STRIDE - len(STAND_IN))) * shard_size
    for s in range(n_shards):
        count = min(shard_size, n - s * shard_size)
        fmt.shard_path(root, s).write_bytes(block[: count * STRIDE])
    np.save(root / fmt.INDEX_FILE, index)
    (root / fmt.IDENTITIES_FILE).write_text(json.dumps(sorted(names)))
    for name in splits.splits_for("synthetic"):
        folds, info = splits.make_split(name, index["age"], index["identity"], 5, seed)
        shards.write_split(root, name, folds, info)
    written = shards.WrittenSamples(index, sorted(names), [], None, n_shards)
    shards.write_manifest(root, written, dataset="synthetic-stand-in", splits=list(splits.splits_for("synthetic")))


def time_start(root: Path) -> dict:
    from agecl.config import LoaderConfig
    from agecl.loader import _TrainEpochs
    from agecl.reader import ShardSet
    from agecl.sampler import TripletSampler

    t0 = time.perf_counter()
    TripletSampler(np.arange(8) % 4, np.arange(8) % 3).epoch(0, 0)  # loads the compiled kernel
    jit = time.perf_counter() - t0

    t0 = time.perf_counter()
    ShardSet(root, verify=False)
    open_noverify = time.perf_counter() - t0
    t = [time.perf_counter()]
    shard_set = ShardSet(root)
    t.append(time.perf_counter())
    ids = shard_set.split_ids("kfold", 0, "train")
    t.append(time.perf_counter())
    epochs = _TrainEpochs(shard_set, ids, LoaderConfig(batch_size=64), rank=0, world_size=1, drop_last=True)
    t.append(time.perf_counter())
    batches = epochs.batches(0)
    t.append(time.perf_counter())
    steps = np.diff(t)
    return {
        "samples": len(shard_set),
        "train_samples": len(ids),
        "batches": len(batches),
        "jit_load_s": round(jit, 2),
        "open_noverify_s": round(open_noverify, 3),
        "open_s": round(steps[0], 3),
        "split_s": round(steps[1], 3),
        "tables_s": round(steps[2], 3),
        "epoch_s": round(steps[3], 3),
        "total_s": round(float(steps.sum()), 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--root", help="where to write the set (default: a temporary folder, removed afterwards)")
    p.add_argument("--time-only", help=argparse.SUPPRESS)
    o = p.parse_args()
    if o.time_only:
        print(json.dumps(time_start(Path(o.time_only))))
        return
    scratch = None if o.root else tempfile.mkdtemp(prefix="bench_start-")
    root = Path(o.root or Path(scratch) / "set")
    try:
        t0 = time.perf_counter()
        make_set(root, o.samples, o.shard_size, o.seed)
        made = time.perf_counter() - t0
        child = subprocess.run([sys.executable, __file__, "--time-only", str(root)], check=True,
                               capture_output=True, text=True)
        result = json.loads(child.stdout.strip().splitlines()[-1])
    finally:
        if scratch:
            shutil.rmtree(scratch, ignore_errors=True)
    print(json.dumps({"bench": "start", "n": o.samples, "shard_size": o.shard_size, **result,
                      "make_set_s": round(made, 1), "commit": commit(), "python": platform.python_version(),
                      "cpu": cpu_name()}))


if __name__ == "__main__":
    main()
