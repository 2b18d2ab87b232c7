"""Training throughput side by side: eager against compiled, fp32 against bf16, the real loader
against a batch already on the device (the ceiling). One JSON line per variant, then a summary
line with loader efficiency (real / ceiling), compile speedup and bf16 speedup.

    python benchmarks/bench_train.py [--shards DIR] [--device auto|cpu|cuda] [--image-size 224]
        [--crop 224] [--batch-size 64] [--steps 10] [--windows 5] [--warmup 5]
        [--variants eager-fp32-synthetic,compiled-bf16-dali,...] [--cpu-bf16] [--loader dali] [--freeze layer3]
        [--out FILE]

A variant is MODE-PRECISION-DATA: MODE eager | compiled (torch.compile of model and loss, as
agecl-train does), PRECISION fp32 | bf16 (autocast), DATA synthetic (fixed tensors on the device:
no loader, no resize; the ceiling) | dali | torch | real (= --loader) (agecl's training loader, exactly as
agecl-train feeds the network: it delivers `--image-size` images drawn from `--crop` crops; with
`--model-resize`, the way before the fifth session: the loader delivers the crop and the model
resizes it on the device, and the synthetic ceiling is a batch of crops the model resizes).
Defaults: on CUDA every mode and precision on synthetic data plus compiled-bf16 with each loader;
on CPU eager and compiled fp32 on synthetic data plus eager-fp32 with each loader (bf16 is slower
than fp32 on CPUs without AMX, faster on those with it: add it with --cpu-bf16 or --variants).

The step is agecl.train.train_step itself. Each variant is built and warmed up first (compile,
DALI pipeline build, cuDNN autotuning: `--warmup` untimed steps), then timed windows of `--steps`
steps alternate between the on-device variants, so that load from other work on the machine falls
on every variant alike; a loader's variant then runs its windows back to back after one untimed
window (a loader keeps queueing batches while other variants run); the median window is reported. On CUDA `torch.cuda.synchronize()` brackets every
window. Images/sec counts the three images of a triplet. Without --shards a synthetic shard set
(agecl.build) is written to a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from provenance import commit  # noqa: E402
import torch  # noqa: E402

from agecl.config import LoaderConfig, LossConfig  # noqa: E402
from agecl.loader import build_train_loader  # noqa: E402
from agecl.losses import age_loss  # noqa: E402
from agecl.model import STAGES, AgeModel  # noqa: E402
from agecl.reader import ShardSet  # noqa: E402
from agecl.train import compile_step, make_optimizer, train_step  # noqa: E402

MODES, PRECISIONS, DATA = ("eager", "compiled"), ("fp32", "bf16"), ("synthetic", "dali", "torch", "real")


def default_variants(device: torch.device, cpu_bf16: bool) -> list[str]:
    if device.type == "cuda":
        return [f"{m}-{p}-synthetic" for m in MODES for p in PRECISIONS] + ["compiled-bf16-dali", "compiled-bf16-torch"]
    out = ["eager-fp32-synthetic", "compiled-fp32-synthetic", "eager-fp32-dali", "eager-fp32-torch"]
    return out + (["eager-bf16-synthetic"] if cpu_bf16 else [])


def _versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import nvidia.dali

        out["dali"] = nvidia.dali.__version__
    except ImportError:
        out["dali"] = None
    return out


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} x{os.cpu_count()}"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} x{os.cpu_count()}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Variant:
    """One trainer configuration, built and warmed up, able to run a timed window of steps."""

    def __init__(self, name: str, args, device: torch.device, shards: ShardSet | None, train_ids):
        self.name = name
        parts = name.split("-")
        if len(parts) != 3 or parts[0] not in MODES or parts[1] not in PRECISIONS or parts[2] not in DATA:
            raise SystemExit(f"bad variant {name!r}: expected MODE-PRECISION-DATA from {MODES}, {PRECISIONS}, {DATA}")
        self.mode, self.precision, self.data = parts
        if self.data == "real":  # the loader agecl-train would use (--loader)
            self.data = args.loader
        self.device, self.b, self.s = device, args.batch_size, args.image_size
        torch.manual_seed(0)
        raw = AgeModel(0, 79, input_size=self.s, freeze=args.freeze).to(device, memory_format=torch.channels_last)  # resizes larger inputs to S
        compiled = self.mode == "compiled"
        self.model, self.loss_fn = compile_step(raw) if compiled else (raw, age_loss)
        fed = args.crop if args.model_resize else self.s  # the side of the images the model is fed
        self.optimizer = make_optimizer(raw.parameters(), 1e-3, 0.0, device)
        self.ctx = torch.autocast(device.type, dtype=torch.bfloat16) if self.precision == "bf16" else nullcontext()
        self.weights = LossConfig()
        if self.data == "synthetic":
            # The ceiling: one batch of crops already on the device, reused every step.
            g = torch.Generator(device="cpu").manual_seed(0)
            images = torch.randn(3 * self.b, 3, fed, fed, generator=g).to(device)
            self.fixed = (images.contiguous(memory_format=torch.channels_last), torch.randint(0, 80, (3 * self.b,), generator=g).to(device))
        else:
            lcfg = LoaderConfig(loader=self.data, batch_size=self.b, image_size=args.crop, output_size=fed, workers=args.workers)
            # drop_last: every step the same shape (no recompiles inside the timing).
            self.loader = build_train_loader(shards, train_ids, lcfg, device, drop_last=True)
            if len(self.loader) == 0:
                raise SystemExit(f"{len(train_ids)} training samples: fewer than one batch of {self.b}")
            self.batches = self._forever()

    def _forever(self):
        epoch = 0
        while True:
            for batch in self.loader.epoch(epoch):
                yield batch
            epoch += 1

    def step(self) -> None:
        if self.data == "synthetic":
            images, targets = self.fixed
        else:
            batch = next(self.batches)
            images = batch.images.contiguous(memory_format=torch.channels_last)  # (3B, 3, fed, fed)
            targets = batch.ages.clamp(0, 79)
        train_step(self.model, self.loss_fn, self.optimizer, self.ctx, images, targets, self.weights, self.b)

    def window(self, steps: int) -> float:
        """Images/sec over `steps` steps, synchronised at both ends."""
        _sync(self.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.step()
        _sync(self.device)
        return 3 * self.b * steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", help="shard folder (default: a synthetic set in a temporary folder)")
    p.add_argument("--samples", type=int, default=320, help="synthetic samples when --shards is not given")
    p.add_argument("--device", default="auto")
    p.add_argument("--image-size", type=int, default=224, help="network input side, pixels")
    p.add_argument("--crop", type=int, default=224, help="loader crop (resized to --image-size when larger)")
    p.add_argument("--model-resize", action="store_true", help="the loader delivers the crop and the model resizes it "
                   "(agecl before the fifth session); default: the loader delivers --image-size")
    p.add_argument("--batch-size", type=int, default=64, help="triplets a step")
    p.add_argument("--workers", type=int, default=4, help="loader threads / worker processes")
    p.add_argument("--loader", choices=("dali", "torch"), default="dali", help="the loader of DATA 'real' (default %(default)s)")
    p.add_argument("--steps", type=int, default=10, help="steps a timed window")
    p.add_argument("--windows", type=int, default=5, help="timed windows a variant (the median is reported)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps a variant first (compile, DALI build)")
    p.add_argument("--variants", help="comma-separated MODE-PRECISION-DATA list (default: see the docstring)")
    p.add_argument("--freeze", default="", choices=("", *STAGES), help="the backbone held fixed up to this stage, as "
                   "agecl-train --freeze (fine-tuning; default: every weight trained)")
    p.add_argument("--cpu-bf16", action="store_true", help="also measure bf16 on a CPU")
    p.add_argument("--out", help="also append the JSON lines to this file")
    args = p.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.set_float32_matmul_precision("high")
    if args.crop < args.image_size:
        raise SystemExit(f"--crop {args.crop} is smaller than --image-size {args.image_size}")
    names = args.variants.split(",") if args.variants else default_variants(device, args.cpu_bf16)

    tmp = None
    shards = train_ids = None
    if any(not n.endswith("-synthetic") for n in names):
        root = args.shards
        if root is None:
            from agecl.build import main as build_main

            tmp = tempfile.TemporaryDirectory(prefix="bench_train-")
            root = str(Path(tmp.name) / "shards")
            if build_main(["--synthetic", str(args.samples), "--out", root, "--quiet", "--workers", "2"]) != 0:
                raise SystemExit("building the synthetic shard set failed")
        shards = ShardSet(root)
        protocol = shards.manifest.get("default_protocol", "kfold")
        train_ids = shards.split_ids(protocol, 0, "train")

    common = {
        "bench": "train",
        "device": str(device),
        "device_name": _device_name(device),
        "threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "crop": args.crop,
        "freeze": args.freeze,
        "model_resize": args.model_resize,
        "workers": args.workers,
        "steps": args.steps,
        "windows": args.windows,
        "warmup": args.warmup,
        "shards": args.shards or f"synthetic {args.samples} (temporary)",
        "versions": _versions(),
        "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }

    # Build and warm every variant first: compile, DALI build and cuDNN autotuning stay untimed.
    variants, warm_s = [], {}
    for name in names:
        t0 = time.perf_counter()
        v = Variant(name, args, device, shards, train_ids)
        for _ in range(args.warmup):
            v.step()
        _sync(device)
        warm_s[name] = time.perf_counter() - t0
        variants.append(v)
        print(f"# {name}: built and warmed up in {warm_s[name]:.1f} s", file=sys.stderr, flush=True)

    # Timed windows alternate between the on-device variants: a busy machine slows each alike. A
    # loader's variant runs its windows back to back instead, after one untimed window: its workers
    # (a DataLoader's processes, DALI's prefetch) go on filling their queue while other variants
    # run, so an alternated window times that queue, and the filling takes the CPU from the others
    # (on the H200, a DataLoader variant alternated with DALI's ran at 12,000 img/s in its first
    # window and 2,200 in its fifth, while DALI's rose from 3,400 to 9,000).
    rates: dict[str, list[float]] = {v.name: [] for v in variants}
    load = []

    def loadavg():
        return os.getloadavg()[0] if hasattr(os, "getloadavg") else None

    for _ in range(args.windows):
        for v in variants:
            if v.data == "synthetic":
                rates[v.name].append(v.window(args.steps))
        load.append(loadavg())
    for v in variants:
        if v.data != "synthetic":
            v.window(args.steps)  # untimed: empties what the loader queued while the others ran
            rates[v.name] = [v.window(args.steps) for _ in range(args.windows)]
            load.append(loadavg())

    lines = []
    for v in variants:
        med = statistics.median(rates[v.name])
        lines.append({
            **common,
            "variant": v.name, "mode": v.mode, "precision": v.precision, "data": v.data,
            "images_per_sec": round(med, 2),
            "step_ms": round(1000 * 3 * args.batch_size / med, 2),
            "windows_images_per_sec": [round(r, 2) for r in rates[v.name]],
            "warmup_s": round(warm_s[v.name], 2),
            "load_avg": load,
        })  # fmt: skip
    by_name = {line["variant"]: line["images_per_sec"] for line in lines}
    summary = {"bench": "train_summary", "device": str(device), "device_name": common["device_name"], "commit": common["commit"],
               "loader_efficiency": {}, "compile_speedup": {}, "bf16_speedup": {}}  # fmt: skip
    for name, rate in by_name.items():
        mode, prec, data = name.split("-")
        ceiling = by_name.get(f"{mode}-{prec}-synthetic")
        if data != "synthetic" and ceiling:
            summary["loader_efficiency"][name] = round(rate / ceiling, 3)
        if mode == "compiled" and f"eager-{prec}-{data}" in by_name:
            summary["compile_speedup"][f"{prec}-{data}"] = round(rate / by_name[f"eager-{prec}-{data}"], 3)
        if prec == "bf16" and f"{mode}-fp32-{data}" in by_name:
            summary["bf16_speedup"][f"{mode}-{data}"] = round(rate / by_name[f"{mode}-fp32-{data}"], 3)
    lines.append(summary)
    text = "".join(json.dumps(line) + "\n" for line in lines)
    sys.stdout.write(text)
    if args.out:
        with open(args.out, "a") as f:
            f.write(text)
    if tmp is not None:
        del variants
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
