"""Triplets per second of the Numba sampler against its vectorised NumPy reference, one core.

    python benchmarks/bench_sampler.py                      # MORPH-sized and FG-NET-shaped sets
    python benchmarks/bench_sampler.py --samples 200000 --cases morph

Each case is a synthetic label set shaped like the dataset (sizes, identities, age range and skew).
Both implementations draw from the same prebuilt `TripletSampler` tables, warm up first (the
Numba warm-up includes compiling or loading the cache), then time `--epochs` rounds; the median
round gives triplets/sec. One JSON line per (case, implementation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numba
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from provenance import commit, cpu_name  # noqa: E402
from agecl.sampler import TripletSampler  # noqa: E402


def morph_like(samples: int, identities: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """(N,) int64 ages 16-77 skewed young (MORPH II: median about 33) and (N,) int64 identities.

    Each person gets a base age and a few photos taken over the following years.
    """
    ids = np.sort(np.concatenate([np.arange(identities), rng.integers(0, identities, samples - identities)]))
    base = 16 + rng.gamma(2.2, 7.5, identities)  # years, per identity
    first = np.searchsorted(ids, ids, "left")  # first photo of each sample's identity
    nth = np.arange(samples) - first  # photo number within the identity
    ages = np.rint(base[ids] + nth * rng.uniform(0.0, 1.5, samples))
    return np.clip(ages, 16, 77).astype(np.int64), ids.astype(np.int64)


def fgnet_like(rng) -> tuple[np.ndarray, np.ndarray]:
    """FG-NET's shape: 1,002 photos of 82 people, ages 0-69, each person photographed from childhood."""
    ids = np.sort(np.concatenate([np.arange(82), rng.integers(0, 82, 1002 - 82)]))
    span = np.clip(15 + rng.gamma(1.5, 12.0, 82), 1, 69)  # oldest age photographed, per identity
    ages = np.rint(rng.uniform(0.0, 1.0, 1002) * span[ids])
    return ages.astype(np.int64), ids.astype(np.int64)


def _time(draw, epochs: int, reps: int) -> tuple[float, float]:
    """(warm-up seconds, median seconds per epoch); each timed round runs `reps` epochs."""
    t0 = time.perf_counter()
    draw(0)  # compiles (or loads the cache) for Numba; first-touch for both
    warmup = time.perf_counter() - t0
    rounds = []
    for e in range(epochs):
        t0 = time.perf_counter()
        for r in range(reps):
            draw(1 + e * reps + r)
        rounds.append((time.perf_counter() - t0) / reps)
    return warmup, statistics.median(rounds)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=55_134, help="MORPH-like case: samples (MORPH II: 55,134)")
    p.add_argument("--identities", type=int, default=13_618, help="MORPH-like case: people (MORPH II: 13,618)")
    p.add_argument("--cases", default="morph,fgnet", help="comma-separated: morph, fgnet")
    p.add_argument("--epochs", type=int, default=15, help="timed rounds per implementation")
    p.add_argument("--min-triplets", type=int, default=50_000, help="triplets per timed round (small sets repeat)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if not 1 <= args.identities <= args.samples:
        p.error("need 1 <= --identities <= --samples")

    numba.set_num_threads(1)  # the single-core figure; the kernels use no prange anyway
    common = {
        "threads": 1,
        "numba": numba.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "machine": {
            "cpu": cpu_name(),
            "processor": platform.processor(),
            "arch": platform.machine(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        },
        "commit": commit(),
        "config": vars(args),
    }
    rng = np.random.default_rng(args.seed)
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case == "morph":
            ages, ids = morph_like(args.samples, args.identities, rng)
        elif case == "fgnet":
            ages, ids = fgnet_like(rng)
        else:
            p.error(f"unknown case {case!r} (morph, fgnet)")
        sampler = TripletSampler(ages, ids)
        n = len(sampler)
        reps = max(1, -(-args.min_triplets // n))
        results = {}
        for impl, draw in (("numpy", lambda e: sampler.epoch_numpy(args.seed, e)),
                           ("numba", lambda e: sampler.epoch(args.seed, e))):  # fmt: skip
            warmup, sec = _time(draw, args.epochs, reps)
            results[impl] = {
                "bench": "sampler",
                "impl": impl,
                "case": case,
                "samples": n,
                "identities": len(sampler.identity_values),
                "ages": len(sampler.age_values),
                "fallback_samples": sampler.fallback_samples,
                "epochs_per_round": reps,
                "rounds": args.epochs,
                "median_sec_per_epoch": sec,
                "triplets_per_sec": n / sec,
                "warmup_sec": warmup,
                **common,
            }
        speedup = results["numpy"]["median_sec_per_epoch"] / results["numba"]["median_sec_per_epoch"]
        results["numba"]["speedup_vs_numpy"] = speedup
        for r in results.values():
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
