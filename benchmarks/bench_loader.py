"""The loaders side by side: images/sec of the DALI train loader, the torch DataLoader baseline with
the same workers/threads, and each one's decode-only figure. One JSON line per measured pipeline.

    python benchmarks/bench_loader.py [--shards DIR] [--batch-size 64] [--workers 2]
        [--image-size 224] [--steps N] [--device cpu|cuda] [--rounds 3]
        [--interpolation linear|nearest] [--loaders dali,torch] [--stages train,decode]

Without --shards it writes a synthetic shard set to a temporary folder (agecl.synthetic faces,
JPEG quality 95 as the builder writes them; random textures if that module is missing).

What is timed: whole epochs of the training loader over a fixed set of `--samples` training ids
(the pipeline, the workers and Numba are warmed by one untimed epoch first), the batch consumed
as a trainer would (on CUDA: `torch.cuda.synchronize()` before the clock stops). Images/sec counts
the three images of a triplet. Pipelines alternate round by round and the median round is
reported, so that a machine shared with other work penalises each the same way; the load
average is recorded, and so is the CPU time an image costs (this process's threads plus the
DataLoader workers, from /proc), which other load on the machine barely changes. "decode" runs
the same loader with the augmentation removed (decode and hand-off only).

Finding on DALI's CPU backend (2.4): its warp_affine is a generic per-pixel sampler, about four
times the cost of decoding the image with bilinear interpolation. The loader therefore runs the
bilinear warp on that backend as a compiled Numba op (agecl.warp) inside the DALI graph; with
--interpolation nearest it uses DALI's warp_affine (cheap in that mode), as on a GPU.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import commit, cpu_name  # noqa: E402
import torch  # noqa: E402

from agecl import format as fmt  # noqa: E402
from agecl.config import LoaderConfig  # noqa: E402
from agecl.loader import build_train_loader, warp_op  # noqa: E402
from agecl.reader import ShardSet  # noqa: E402
from agecl.shards import Sample, write_manifest, write_samples  # noqa: E402


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _texture(rng: np.random.Generator) -> np.ndarray:
    """(256, 256, 3) uint8: smooth colour blobs plus fine noise, about a face's JPEG size."""
    from PIL import Image

    small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((fmt.IMAGE_SIZE,) * 2, Image.BICUBIC)
    noise = rng.normal(0, 6, (fmt.IMAGE_SIZE, fmt.IMAGE_SIZE, 3))
    return np.clip(np.asarray(small, np.float32) + noise, 0, 255).astype(np.uint8)


def synthetic_shards(out: Path, n: int, seed: int = 0) -> str:
    """Write n samples to `out`; returns which generator made them."""
    try:
        from agecl.synthetic import synthetic_samples

        samples = [Sample(int(s.age), s.identity, s.source, _jpeg(s.image)) for s in synthetic_samples(n, seed=seed)]
        kind = "agecl.synthetic"
    except ImportError:
        rng = np.random.default_rng(seed)
        samples = [
            Sample(age=int(rng.integers(16, 78)), identity=f"p{i % max(2, n // 4)}", source=f"t/{i:06d}.jpg", jpeg=_jpeg(_texture(rng)))
            for i in range(n)
        ]
        kind = "textures"
    w = write_samples(out, samples, shard_size=1000)
    write_manifest(out, w, dataset=f"bench-{kind}")
    return kind


def _versions() -> dict:
    import torchvision

    try:
        import nvidia.dali as dali

        dali_version = dali.__version__
    except ImportError:
        dali_version = None
    return {
        "dali": dali_version,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(x) for x in (task / "children").read_text().split()]
        except OSError:  # a thread that ended meanwhile
            pass
    return out


def cpu_seconds() -> float:
    """CPU time used so far by this process (every thread: DALI's included) and its live children
    (DataLoader workers): the cost of a pipeline whatever else the machine is running."""
    total = time.process_time()
    tick = os.sysconf("SC_CLK_TCK")
    try:
        children = _children(os.getpid())
    except OSError:  # no /proc: wall-clock figures only
        return float("nan")
    for child in children:
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class Measured:
    """One pipeline: a loader, its untimed warm-up epoch, then timed rounds of whole epochs."""

    def __init__(self, shards, ids, cfg, device, stage, epochs_per_round):
        self.cfg, self.stage, self.device = cfg, stage, torch.device(device)
        self.loader = build_train_loader(shards, ids, cfg, device=device, stage=stage)
        self.epochs_per_round = epochs_per_round
        self.epoch = 0
        self.rounds: list[float] = []  # images/sec of each timed round
        self.cpu_ms: list[float] = []  # CPU milliseconds an image, each timed round
        t0 = time.perf_counter()
        self._run(1)  # warm-up: pipeline build / worker start, Numba, first touch of the shards
        self.warmup_sec = time.perf_counter() - t0

    def _run(self, epochs: int) -> int:
        images = 0
        for _ in range(epochs):
            for batch in self.loader.epoch(self.epoch):
                images += batch.images.shape[0]
            self.epoch += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()  # the last batch is done, not just queued
        return images

    def round(self) -> None:
        c0, t0 = cpu_seconds(), time.perf_counter()
        images = self._run(self.epochs_per_round)
        t1, c1 = time.perf_counter(), cpu_seconds()
        self.rounds.append(images / (t1 - t0))
        self.cpu_ms.append(1000 * (c1 - c0) / images)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="", help="shard folder (default: a synthetic set in a temp folder)")
    p.add_argument("--batch-size", type=int, default=64, help="triplets a batch (3x images)")
    p.add_argument("--workers", type=int, default=2, help="DALI threads / DataLoader worker processes")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=0, help="timed steps a round (default: 24 on CPU, 400 on CUDA), rounded up to whole epochs")
    p.add_argument("--samples", type=int, default=0,
                   help="training ids an epoch (default: a round's worth, --steps batches, from --shards; a synthetic "
                        "set gets 10 batches' worth on CPU, 40 on CUDA)")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="timed rounds per pipeline, alternating pipelines")
    p.add_argument("--prefetch", type=int, default=2)
    p.add_argument("--interpolation", default="linear", choices=["linear", "nearest"])
    p.add_argument("--flip", default="horizontal", choices=["horizontal", "vertical", "none"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--loaders", default="dali,torch")
    p.add_argument("--stages", default="train,decode")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    steps = args.steps or (400 if device.type == "cuda" else 24)
    loaders = [x for x in args.loaders.split(",") if x]
    stages = [x for x in args.stages.split(",") if x]

    with tempfile.TemporaryDirectory(prefix="bench_loader_") as tmp:
        generator = None
        if args.shards:
            root = Path(args.shards)
        else:
            root = Path(tmp) / "shards"
            n = args.samples or (40 if device.type == "cuda" else 10) * args.batch_size
            t0 = time.perf_counter()
            generator = synthetic_shards(root, n, args.seed)
            print(f"# wrote {n} synthetic samples ({generator}) in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        shards = ShardSet(root)
        n = min(len(shards), args.samples or steps * args.batch_size)  # one epoch a round where the set allows
        ids = np.sort(np.random.default_rng(args.seed).choice(len(shards), n, replace=False))
        steps_per_epoch = math.ceil(n / args.batch_size)
        epochs_per_round = math.ceil(steps / steps_per_epoch)

        load_before = os.getloadavg()
        pipelines = []
        for stage in stages:
            for loader in loaders:
                cfg = LoaderConfig(
                    loader=loader,
                    batch_size=args.batch_size,
                    image_size=args.image_size,
                    workers=args.workers,
                    prefetch=args.prefetch,
                    interpolation=args.interpolation,
                    flip=args.flip,
                    seed=args.seed,
                )
                pipelines.append(Measured(shards, ids, cfg, device, stage, epochs_per_round))
        for _ in range(args.rounds):
            for m in pipelines:
                m.round()
        load_after = os.getloadavg()

        common = {
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "batch_size": args.batch_size,
            "workers": args.workers,
            "image_size": args.image_size,
            "prefetch": args.prefetch,
            "interpolation": args.interpolation,
            "flip": args.flip,
            "samples": n,
            "steps_per_round": epochs_per_round * steps_per_epoch,
            "rounds": args.rounds,
            "shards": str(args.shards) if args.shards else f"synthetic ({generator})",
            "versions": _versions(),
            "cpu_count": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
            "commit": commit(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        best = {(m.cfg.loader, m.stage): statistics.median(m.rounds) for m in pipelines}
        for m in pipelines:
            ips = best[(m.cfg.loader, m.stage)]
            row = {
                "bench": "loader",
                "loader": m.cfg.loader,
                "stage": m.stage,
                "images_per_sec": round(ips, 1),
                "images_per_sec_rounds": [round(r, 1) for r in m.rounds],
                # CPU time an image (all threads and workers): robust to other load on the machine
                "cpu_ms_per_image": round(statistics.median(m.cpu_ms), 3),
                "warmup_sec": round(m.warmup_sec, 2),
                # the op that warps (DALI train stage only)
                "warp": warp_op(m.cfg, device.type == "cuda") if (m.cfg.loader, m.stage) == ("dali", "train") else None,
                **common,
            }
            if m.cfg.loader == "dali" and ("torch", m.stage) in best:
                row["speedup_vs_torch"] = round(ips / best[("torch", m.stage)], 2)
                torch_cpu = statistics.median(next(t for t in pipelines if (t.cfg.loader, t.stage) == ("torch", m.stage)).cpu_ms)
                row["cpu_efficiency_vs_torch"] = round(torch_cpu / statistics.median(m.cpu_ms), 2)
            print(json.dumps(row), flush=True)

if __name__ == "__main__":
    main()
