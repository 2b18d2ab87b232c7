"""The training loop (`agecl-train`): triplets in, an age model and its test-fold results out.

    agecl-train --shards shards/morph                       # the paper's settings, one fold
    agecl-train --shards shards/morph --protocol se --all-folds
    agecl-train --shards shards/fgnet --protocol lopo --all-folds --jobs 8
    torchrun --nproc_per_node 8 -m agecl.train --shards shards/morph
    agecl-train --shards shards/synthetic --image-size 64 --epochs 3 --device cpu --out runs/try

It reads top to bottom like nanoGPT's train.py: configuration, distributed setup, data, model,
resume, compile, DDP wrap, the loop, the test-fold evaluation. One code path for CPU and GPU, fp32
and bf16: only `ctx` (autocast or nothing) and a few flags (compile, fused Adam) differ.

Inside a step nothing reads a tensor on the host: the loss terms accumulate on the device and
are read at one labelled sync point every `log_every` steps and at the end of an epoch. On CUDA
the model and the loss are compiled (not the loader: DALI cannot run inside a CUDA graph), run
under bf16 autocast in channels_last, and Adam is fused.

A run folder `runs/<name>/` holds config.json, metrics.jsonl (one line per log interval and one
per epoch), checkpoint.pt (every epoch, atomic; `--resume` continues from the next epoch),
then results.json and predictions.npz (the final epoch's model on the test fold: nothing is
selected on the test fold) and curves.png (every metric per epoch). `--all-folds` runs every fold
in `runs/<name>/fold-<k>/` (a fold with results.json is skipped when the command runs again) and
aggregates them (agecl.evaluate).
LOPO folds are tiny (one FG-NET person each): `--all-folds --jobs N` trains N folds at once, one
process each, so that a large GPU is kept busy.

Exact resume: the triplets of epoch e are a pure function of (seed, e) (agecl.sampler) and both
loaders draw each batch's augmentation from (seed, rank, epoch, step), so a run killed and resumed
computes the same weights as an uninterrupted one (CPU, fp32; on a GPU up to the nondeterminism
of its kernels).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import math
import os
import platform
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from agecl import dist
from agecl import evaluate as ev
from agecl import finetune
from agecl import format as fmt
from agecl import plots
from agecl.atomic import EXIT_DISK_FULL, DiskFullError, disk_full_message, is_disk_full, write_json, write_text
from agecl.checkpoint import (
    CheckpointError, check_compatible, drop_optimizer_state, load_checkpoint, save_checkpoint, set_rng_state,
)
from agecl.config import NO_TEST_FOLD, TrainConfig, apply_overrides, describe, from_dict, to_dict
from agecl.loader import build_eval_loader, build_train_loader
from agecl.losses import age_balance_weights, age_loss, apply_train_preset, triplet_parts
from agecl.model import STAGES, AgeModel, PretrainedError
from agecl.reader import ShardSet

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
CHECKPOINT_FILE = "checkpoint.pt"
RESULTS_FILE = ev.RESULTS_FILE
# The values logged: age_loss's weighted total, its unweighted terms, and the anchors' train MAE.
LOG_TERMS = ("total", "ce", "mean", "variance", "cosine", "triplet", "kl", "mae")
LOG_KEYS = tuple("train_mae" if k == "mae" else k for k in LOG_TERMS)  # their names in metrics.jsonl
# Debug only: when set to a folder, each rank writes the sample ids of its anchors per epoch there
# (anchors-rank<r>-epoch<e>.npy); the DDP test checks that the ranks' anchors are disjoint.
DEBUG_ANCHORS_ENV = "AGECL_DEBUG_ANCHORS"


class TrainError(RuntimeError):
    """A run cannot start or continue; the message says why and what to do."""


# --- Configuration from the command line ---------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="agecl-train",
        description="Train an age model with contrastive triplets (Chae et al., arXiv 2308.11896) on a shard set. "
        "Defaults are the paper's: Adam, lr 0.001, 100 epochs, 64 triplets a batch, 224 crops.",
        epilog="Order of precedence: defaults < --config < --preset < the flags above < --set. "
        "Multi-GPU: torchrun --nproc_per_node N -m agecl.train ... "
        "Exit status: 0 done; 2 bad arguments, shard set or checkpoint, or a loss that became non-finite "
        f"(the last good checkpoint is kept); {EXIT_DISK_FULL} out of disk space (free space, then the same "
        "command with --resume continues); 130 interrupted. --debug shows tracebacks.",
    )
    p.add_argument("--shards", help="shard folder written by tools/make_shards.py (required unless --config names one)")
    p.add_argument("--config", metavar="FILE", help="start from a saved configuration: a run's config.json (or its "
                   "folder) to train it again; flags and --set still apply, and the run gets its own folder")
    p.add_argument("--protocol", help="split name: rs, se, lopo, kfold or any split of the set (default: the manifest's default_protocol)")
    folds = p.add_mutually_exclusive_group()
    folds.add_argument("--fold", type=_fold_arg, help="test fold (default 0); training uses every other fold. "
                       "none: no test fold, train on every fold (the model to carry forward once the recipe is chosen)")
    folds.add_argument("--all-folds", action="store_true", help="run every fold in turn (runs/<name>/fold-<k>/), then aggregate")
    p.add_argument("--jobs", type=int, default=1, help="with --all-folds: folds trained at once, one process each "
                   "(small folds such as LOPO's leave a GPU idle one at a time; default 1)")
    p.add_argument("--preset", help="loss preset of agecl.losses.PRESETS, e.g. paper-morph-ternary, mv (applied first)")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int, help="triplets a batch (3x as many images)")
    p.add_argument("--lr", type=float, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), help="constant (the paper's) or cosine decay to 0")
    p.add_argument("--image-size", type=int, help="side of the network input, pixels (224, the paper's crop; e.g. 64 for quick CPU runs: "
                   "the 224 crop is then resized, so the network sees the whole face at lower resolution)")
    p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--loader", choices=("dali", "torch"), help="data loader (dali: GPU decode; torch: DataLoader baseline)")
    p.add_argument("--workers", type=int, help="DALI threads / DataLoader worker processes")
    p.add_argument("--compile", choices=("auto", "on", "off"), help="torch.compile model and loss (auto: on for CUDA)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="off", help="same as --compile off")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), help="auto: bf16 on CUDA and on CPUs that run it natively (AMX or AVX512-BF16), fp32 elsewhere")
    p.add_argument("--arch", help="backbone: resnet18 (the paper's), resnet34, resnet50, resnet101")
    p.add_argument("--pretrained", nargs="?", const="imagenet", help="backbone weights: imagenet (the paper's; the default when the flag has no value) or a file")
    p.add_argument("--init-from", metavar="RUN_OR_CHECKPOINT", help="fine-tune: start from another run's weights, its "
                   "checkpoint.pt or its run folder (one fold's); the backbone, and the age head class by class by age")
    p.add_argument("--freeze", choices=STAGES, help="fine-tuning: hold the backbone fixed from the stem up to this "
                   "stage (weights and BatchNorm statistics); the backward pass stops there, so a step costs less")
    p.add_argument("--flip", choices=("horizontal", "vertical", "none"), help="random flip (the paper's text says vertical)")
    p.add_argument("--grey", type=float, metavar="P", help="probability that a training image is shown in greyscale "
                   "(default 0, the paper's; FG-NET has scanned greyscale photos that colour-only sets never show)")
    p.add_argument("--tta", choices=ev.TTA_MODES, help="the test fold's evaluation-time augmentation: flip averages the "
                   "age distributions of each face and its mirror (default none)")
    p.add_argument("--min-age", type=int, help="lowest age class (default: the shard set's)")
    p.add_argument("--max-age", type=int, help="highest age class (default: the shard set's)")
    p.add_argument("--seed", type=int, help="seed of the model init, the triplet order and the augmentation")
    p.add_argument("--log-every", type=int, help="steps between logging (host sync) points")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--name", help="run name (default: <shard folder>-<protocol>-fold<k>; with --all-folds <shard folder>-<protocol>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run folder from its checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its message")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="any config field, e.g. --set loss.triplet=1 --set loader.rotate_degrees=10 (repeatable; unknown keys are an error)")
    return p


def load_config(path: Path | str) -> TrainConfig:
    """The TrainConfig saved in a run folder's config.json (`path` is the file or the folder), with
    its run folder and name cleared: training it again must not continue or overwrite that run."""
    path = Path(path)
    if path.is_dir():
        path = path / CONFIG_FILE
    try:
        cfg = from_dict(TrainConfig, json.loads(path.read_text()))
    except FileNotFoundError:
        raise ValueError(f"{path}: no such configuration file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not a JSON configuration ({e})") from None
    except (KeyError, TypeError, AttributeError) as e:  # unknown keys, or not the shape of a TrainConfig
        raise ValueError(f"{path}: not an agecl configuration ({e})") from None
    cfg.out, cfg.name = "", ""
    return cfg


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed arguments: defaults (or --config), then the preset, then flags, then --set."""
    cfg = load_config(args.config) if args.config else TrainConfig()
    overrides = list(args.overrides)
    # A preset rewrites every loss weight: it goes first so that flags and --set win over it.
    preset = args.preset
    for item in list(overrides):
        if item.split("=", 1)[0].strip() == "preset":
            preset = item.split("=", 1)[1] if "=" in item else preset
            overrides.remove(item)
    if preset:
        apply_train_preset(cfg, preset)
    if args.shards:
        cfg.data.shards = args.shards
    if not cfg.data.shards:
        raise ValueError("no shard folder: pass --shards (or a --config that names one)")
    flags = {
        "data.protocol": args.protocol,
        "data.fold": args.fold,
        "data.min_age": args.min_age,
        "data.max_age": args.max_age,
        "epochs": args.epochs,
        "lr": args.lr,
        "lr_schedule": args.lr_schedule,
        "loader.batch_size": args.batch_size,
        "model.input_size": args.image_size,
        "loader.loader": args.loader,
        "loader.workers": args.workers,
        "loader.flip": args.flip,
        "loader.grey": args.grey,
        "device": args.device,
        "compile": args.compile,
        "precision": args.precision,
        "model.arch": args.arch,
        "model.pretrained": args.pretrained,
        "model.init_from": args.init_from,
        "model.freeze": args.freeze,
        "log_every": args.log_every,
        "test_tta": args.tta,
        "out": args.out,
        "name": args.name,
    }
    apply_overrides(cfg, [f"{k}={v}" for k, v in flags.items() if v is not None])
    if args.seed is not None:  # one seed for the model init and for the loader (triplets, augmentation)
        cfg.seed = cfg.loader.seed = args.seed
    apply_overrides(cfg, overrides)
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise TrainError(f"device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device {name!r}: no CUDA GPU is visible (use --device cpu)")
    if device.type not in ("cuda", "cpu"):
        raise TrainError(f"device {name!r}: expected auto, cpu, cuda or cuda:N")
    return device


def _fold_arg(text: str) -> int:
    """--fold: a fold number, or "none" (NO_TEST_FOLD)."""
    if text.strip().lower() == "none":
        return NO_TEST_FOLD
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text}: a fold is a number >= 0, or none")
    return value


def resolve(cfg: TrainConfig, shards: ShardSet, fold_dir: bool = False) -> TrainConfig:
    """Fill what the defaults leave to the data: protocol, age range, run name and folder.

    The resolved values are what config.json and the checkpoint store, so that a resumed run is
    checked against the protocol and ages it actually used.
    """
    cfg = copy.deepcopy(cfg)
    m = shards.manifest
    if not cfg.data.protocol:
        cfg.data.protocol = m.get("default_protocol") or ""
        if not cfg.data.protocol:
            raise TrainError(f"{shards.root}: the manifest names no default_protocol; pass --protocol")
    shards.split(cfg.data.protocol)  # an unknown split fails here, listing the known ones
    if cfg.data.min_age < 0:
        cfg.data.min_age = shards.min_age
    if cfg.data.max_age < 0:
        cfg.data.max_age = shards.max_age
    if cfg.model.input_size > cfg.loader.image_size:
        raise TrainError(
            f"image size {cfg.model.input_size} exceeds the loader's crop ({cfg.loader.image_size} px of the stored face); "
            f"to train on larger crops add --set loader.image_size={cfg.model.input_size}"
        )
    if cfg.model.input_size <= 0:
        cfg.model.input_size = cfg.loader.image_size
    if cfg.loader.output_size <= 0:
        # The loader delivers what the network takes: a 64 px network gets 64 px images drawn
        # straight from the stored face, not 224 px crops to shrink (agecl.loader.shrink_factor).
        cfg.loader.output_size = cfg.model.input_size
    # loader.parts 0 (only what the loss reads) stays 0 in the config; the loader gets the number.
    if 0 < cfg.loader.parts < triplet_parts(cfg.loss):
        raise TrainError(f"loader.parts {cfg.loader.parts}: this loss reads {triplet_parts(cfg.loss)} images of each triplet "
                         "(cosine or KL: 2; the triplet term or loss.supervise=triplet: 3)")
    if not 0 <= cfg.data.min_age <= cfg.data.max_age:
        raise TrainError(f"age range {cfg.data.min_age}..{cfg.data.max_age}: need 0 <= min_age <= max_age")
    stem = f"{Path(cfg.data.shards).resolve().name}-{cfg.data.protocol}"
    fold_name = "all" if cfg.data.fold == NO_TEST_FOLD else f"fold{cfg.data.fold}"
    if not cfg.name:
        cfg.name = Path(cfg.out).name if cfg.out else (stem if fold_dir else f"{stem}-{fold_name}")
    if not cfg.out:
        cfg.out = str(Path("runs") / cfg.name)
    return cfg


def _read_cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: nothing to read cheaply
        return ""


def native_bf16_feature(cpuinfo: str | None = None) -> str | None:
    """The CPU feature that runs bf16 matrix work natively here ("amx_bf16" or "avx512_bf16", as
    Linux's /proc/cpuinfo names them), or None. Without one, oneDNN emulates bf16 and a network
    runs slower in bf16 than in fp32; with one, bf16 is 1.6-2.6x faster (benchmarks/RESULTS.md).
    Where nothing can be read (not Linux), None: the safe choice (fp32) follows."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    flags = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
    return next((f for f in ("amx_bf16", "avx512_bf16") if f in flags), None)


def cpu_name(cpuinfo: str | None = None) -> str:
    """The processor as /proc/cpuinfo names it, with its family and model numbers, which tell apart
    kinds that share a marketing name ("AMD EPYC (family 25, model 17)" is a Zen 4, family 26 a
    Zen 5); the platform's own word where /proc/cpuinfo says nothing."""
    if cpuinfo is None:
        cpuinfo = _read_cpuinfo()
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            if fields:  # the first processor's block has ended
                break
            continue
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown"
    numbers = [f"{k} {fields[v]}" for k, v in (("family", "cpu family"), ("model", "model")) if fields.get(v)]
    return f"{name} ({', '.join(numbers)})" if numbers else name


def machine_facts(device: torch.device, precision: str, cpuinfo: str | None = None) -> dict:
    """What a run ran on, beyond its configuration. One recipe gives other numbers on another kind
    of processor, with another number of threads (the sums split differently) or another torch
    (oneDNN and cuDNN pick their kernels by the hardware). Each fold's results.json records this,
    and `agecl.evaluate.aggregate` names the folds of a row that ran on different machines."""
    processor = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(cpuinfo)
    threads = torch.get_num_threads() if device.type == "cpu" else None  # a GPU's sums do not split by them
    return {"device": device.type, "processor": processor, "threads": threads,
            "precision": precision, "torch": str(torch.__version__)}


def choose_precision(requested: str, device: torch.device, cpuinfo: str | None = None) -> tuple[str, str]:
    """(precision, why) for `--precision requested` on `device`: "auto" is bf16 on CUDA and on a
    CPU that runs bf16 natively (`native_bf16_feature`), fp32 elsewhere."""
    if requested in ("bf16", "fp32"):
        return requested, "set with --precision"
    if requested != "auto":
        raise TrainError(f"precision {requested!r}: expected auto, bf16 or fp32")
    if device.type == "cuda":
        return "bf16", "auto: a CUDA GPU"
    feature = native_bf16_feature(cpuinfo)
    if feature:
        return "bf16", f"auto: this CPU runs bf16 natively ({feature})"
    return "fp32", "auto: this CPU has neither AMX nor AVX512-BF16, so bf16 would be emulated and slower than fp32"


def _compile(cfg: TrainConfig, device: torch.device) -> bool:
    if cfg.compile not in ("auto", "on", "off"):
        raise TrainError(f"compile {cfg.compile!r}: expected auto, on or off")
    return cfg.compile == "on" or (cfg.compile == "auto" and device.type == "cuda")


def make_optimizer(params, lr: float, weight_decay: float, device: torch.device) -> torch.optim.Adam:
    """Adam over the parameters that train (not those `--freeze` holds), fused (one kernel over every
    parameter) on CUDA and on the CPU alike: on a 2-core CPU the fused update of ResNet-18 takes
    10 ms against 32 ms for the for-each one, 4% of a step."""
    trained = [p for p in params if p.requires_grad]
    return torch.optim.Adam(trained, lr=lr, weight_decay=weight_decay, fused=device.type in ("cuda", "cpu"))


def compile_step(model: torch.nn.Module, loss_fn=age_loss, backend: str = "inductor"):
    """(compiled model, compiled loss): what the trainer runs when compile is on (by default on
    CUDA). Each is one whole graph (`fullgraph`: a graph break is a bug, not a slowdown to find
    later); not the loader, since DALI cannot run inside a CUDA graph. The tests compile this very
    function on the CPU with a cheap backend and compare it with the eager step."""
    return (torch.compile(model, backend=backend, fullgraph=True),
            torch.compile(loss_fn, backend=backend, fullgraph=True))


def _template(manifest: dict) -> dict:
    t = manifest.get("template") or {}
    return {"size": int(t.get("size", fmt.IMAGE_SIZE)), "coverage": float(t.get("coverage", fmt.DEFAULT_COVERAGE)),
            "border": fmt.template_border(t)}


# --- Run-folder files ------------------------------------------------------------------------------


def _append_jsonl(path: Path, row: dict) -> None:
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    except OSError as e:  # a line cut short is dropped on --resume (_truncate_metrics)
        if is_disk_full(e):
            raise DiskFullError(e.errno, path, RESUME_HINT) from e
        raise


RESUME_HINT = "run the same command with --resume: it continues from the last checkpoint"


def _check_finite(values: Sequence[float], epoch: int, first_step: int, step: int, ckpt_path: Path,
                  done_epochs: int) -> None:
    """Stop a diverged run, at a sync point (the values are on the host already: no extra sync).

    Raised before the checkpoint of the epoch is written, so the last good one stays."""
    if math.isfinite(values[0]):  # the weighted total: what the optimizer follows
        return
    bad = {k: v for k, v in zip(LOG_KEYS, values) if not math.isfinite(v)}
    kept = (f"{ckpt_path} keeps epoch {done_epochs}, the last good one" if done_epochs > 0
            else "no checkpoint was written")
    steps = f"step {step}" if first_step >= step else f"steps {first_step}-{step}"
    raise TrainError(
        f"the loss became non-finite in epoch {epoch}, {steps} ({', '.join(f'{k} {v}' for k, v in bad.items())}); "
        f"training stopped and {kept}. Lower the learning rate (--lr) and start a new run folder (--out): "
        "a resumed run keeps its configuration"
    )


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop the log lines a killed run wrote after its last checkpoint (at `step`)."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:  # a line the kill cut short
            continue
    write_text(path, "".join(line + "\n" for line in keep))


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of step `step` (0-based) of `total_steps`: cfg.lr throughout ("constant",
    the paper's), or a cosine decay from cfg.lr to 0 ("cosine"). A function of the step alone, so
    a resumed run continues the same schedule."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        return 0.5 * cfg.lr * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))
    raise TrainError(f"lr_schedule {cfg.lr_schedule!r}: expected constant or cosine")


def train_step(model, loss_fn, optimizer, ctx, images, targets, weights, batch: int) -> dict:
    """One optimisation step: forward and loss under `ctx`, backward, Adam. No host sync.

    images (3b, 3, S, S) on the device, rows [0:b] anchors, [b:2b] positives, [2b:3b] negatives
    (or the first one or two parts alone: LoaderConfig.parts); targets (3b,) int64 class indices
    (age - min_age), as many as the images. Returns age_loss's dict of 0-d tensors.
    """
    with ctx:
        features, logits = model(images)  # (parts * b, D), (parts * b, A)
        terms = loss_fn(features, logits, targets, weights, batch)  # dict of 0-d float32
    optimizer.zero_grad(set_to_none=True)
    terms["total"].backward()
    optimizer.step()
    return terms


# --- One fold ------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, on_epoch_end=None) -> dict:
    """Train one fold as `cfg` says and evaluate its final model on the test fold (with
    cfg.data.fold = NO_TEST_FOLD: train on every fold, test nothing, and keep the checkpoint).

    on_epoch_end (Python API, one process only; benchmarks/time_to_mae.py): called as
    `on_epoch_end(epoch, model)` after each epoch's checkpoint with the plain model; a true return
    value ends the training there (the final evaluation still runs). It must never be used to
    choose anything on the test fold.

    Returns the results dict (what results.json holds: test_mae, test_cs5, mean_age_baseline,
    protocol, fold, ...) on every rank. `resume`: continue from the run folder's checkpoint (a
    missing checkpoint starts afresh); without it, a run folder holding a checkpoint is refused.
    Raises TrainError / CheckpointError / FormatError with a message naming the file and the reason.
    """
    t_start = time.time()
    # -- setup: device, distributed, seeds, precision ---------------------------------------------
    device = resolve_device(cfg.device)
    ddp_info = dist.init(device.type)
    ddp, rank, world = ddp_info.ddp, ddp_info.rank, ddp_info.world_size
    master = ddp_info.is_main
    if ddp and device.type == "cuda":
        device = torch.device("cuda", ddp_info.local_rank)
    torch.manual_seed(cfg.seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
    np.random.seed(cfg.seed)
    precision, precision_why = choose_precision(cfg.precision, device)
    learning_rate(cfg, 0, 1)  # an unknown schedule fails now, not after the data is set up
    if cfg.test_tta not in ev.TTA_MODES:
        raise TrainError(f"test_tta {cfg.test_tta!r}: expected one of {', '.join(ev.TTA_MODES)}")
    if cfg.model.freeze not in ("", *STAGES):
        raise TrainError(f"model.freeze {cfg.model.freeze!r}: expected one of {', '.join(STAGES)} (or nothing)")
    if cfg.model.freeze and not (cfg.model.init_from or cfg.model.pretrained):
        raise TrainError(f"model.freeze {cfg.model.freeze}: a frozen stage of a randomly initialised backbone learns "
                         "nothing; fine-tune (--init-from, --pretrained) or leave it unset")
    if cfg.loss.balance < 0:
        raise TrainError(f"loss.balance {cfg.loss.balance}: the age balance's exponent must be >= 0 (0: every image alike)")
    use_compile = _compile(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick the fastest kernels
        torch.set_float32_matmul_precision("high")  # TF32 for what runs outside autocast
    # One code path for every precision: autocast or nothing. bf16 needs no GradScaler.
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else nullcontext()
    # channels_last: the layout cuDNN's (and oneDNN's) fastest convolutions want.
    memory_format = torch.channels_last

    # -- data: shard set, protocol fold, loaders --------------------------------------------------
    shards = ShardSet(cfg.data.shards)
    cfg = resolve(cfg, shards)
    run_dir = Path(cfg.out)
    ckpt_path = run_dir / CHECKPOINT_FILE
    protocol, fold = cfg.data.protocol, cfg.data.fold
    min_age, max_age = cfg.data.min_age, cfg.data.max_age
    n_folds = int(shards.split(protocol).max()) + 1
    train_ids = shards.split_ids(protocol, fold, "train")  # (N_train,) int64 sample ids
    test_ids = shards.split_ids(protocol, fold, "test")  # (N_test,)
    has_test = fold != NO_TEST_FOLD
    if len(train_ids) == 0 or (has_test and len(test_ids) == 0):
        raise TrainError(f"{protocol} fold {fold} of {shards.root}: {len(train_ids)} training, {len(test_ids)} test samples")
    template = _template(shards.manifest)
    # The images of each triplet the loader delivers and the network computes (0: what the loss reads).
    parts = cfg.loader.parts or triplet_parts(cfg.loss)
    # A run folder is continued only on request, and only by the configuration that wrote it:
    # checked before anything is built or written.
    ckpt = None
    if ckpt_path.is_file():
        if not resume:
            raise TrainError(
                f"{ckpt_path}: this run folder already holds a checkpoint; pass --resume to continue it, "
                "or --name / --out for a new run"
            )
        ckpt = load_checkpoint(ckpt_path, map_location="cpu")
        # The fine-tuning source as the run recorded it when it started (not read again: it may be gone).
        cfg.model.init_source = ckpt["config"].get("model", {}).get("init_source", {})
        # loader.parts compares by the images it delivers (0: what the loss reads; absent: all three).
        then = ckpt["config"].get("loader", {}).get("parts", 3) or triplet_parts(cfg.loss)
        same_parts = ("loader.parts",) if then == parts else ()
        check_compatible(ckpt, cfg, min_age=min_age, max_age=max_age, template=template, ignore=same_parts)
    elif resume:
        dist.print0(f"{ckpt_path}: no checkpoint yet; starting the run")
    source = None  # the checkpoint a new run is fine-tuned from (--init-from)
    if ckpt is None:
        source = finetune.load_source(cfg.model.init_from, cfg.model.arch) if cfg.model.init_from else None
        cfg.model.init_source = finetune.describe(source) if source is not None else {}
        if source is not None and (mismatch := finetune.frame_mismatch(source, template)):
            dist.print0(mismatch)
    train_loader = build_train_loader(shards, train_ids, dataclasses.replace(cfg.loader, parts=parts), device,
                                      rank=rank, world_size=world)
    if train_loader.note:
        dist.print0(train_loader.note)
    steps_per_epoch = len(train_loader)
    baseline = ev.mean_age_baseline(shards.ages[train_ids], shards.ages[test_ids]) if has_test else None

    # -- model and optimizer -------------------------------------------------------------------------
    # A resumed run takes every weight from its checkpoint, a fine-tuned one its backbone from the
    # source: no backbone download for nothing.
    raw_model = AgeModel(
        min_age, max_age, arch=cfg.model.arch, pretrained=cfg.model.pretrained if ckpt is None and source is None else "",
        input_size=cfg.model.input_size, freeze=cfg.model.freeze,
    )
    if source is not None:
        dist.print0(finetune.init_model(raw_model, source))
        del source
    raw_model = raw_model.to(device, memory_format=memory_format)
    optimizer = make_optimizer(raw_model.parameters(), cfg.lr, cfg.weight_decay, device)

    # -- resume or start ---------------------------------------------------------------------------------
    start_epoch, step = 0, 0
    if ckpt is not None:
        raw_model.load_state_dict(ckpt["model"])
        if ckpt.get("optimizer") is not None:
            optimizer.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        dist.print0(f"resuming {ckpt_path} after epoch {start_epoch} (step {step})")
        del ckpt
    if master:
        dist.print0(f"precision {precision} ({precision_why})")
        dist.print0(describe(cfg))
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / CONFIG_FILE, to_dict(cfg))
        _truncate_metrics(run_dir / METRICS_FILE, step)
        dist.print0(
            f"{shards.root}: {protocol} {f'fold {fold} of {n_folds}' if has_test else f'all {n_folds} folds, no test'}: "
            f"{len(train_ids)} training, {len(test_ids)} test "
            f"samples, ages {min_age}-{max_age}; {steps_per_epoch} steps an epoch x {world} rank(s); "
            f"{device.type} {precision}, compile {'on' if use_compile else 'off'}, loader {cfg.loader.loader}; "
            f"run folder {run_dir}"
        )

    # -- compile and DDP wrap ---------------------------------------------------------------------------
    # The model and the loss are compiled separately (not the loader: DALI cannot run inside a CUDA
    # graph). Compile first, then wrap in DDP, as nanoGPT does: DDP around a compiled module lets
    # dynamo split the graph at gradient buckets so all-reduce overlaps the backward pass.
    model, loss_fn = compile_step(raw_model) if use_compile else (raw_model, age_loss)
    if cfg.loss.balance:  # the age terms weighted by age, from the training images' ages
        counts = np.bincount(np.clip(shards.ages[train_ids] - min_age, 0, max_age - min_age), minlength=max_age - min_age + 1)
        class_weights = torch.from_numpy(age_balance_weights(counts, cfg.loss.balance)).to(device)  # (A,)
        loss_fn = functools.partial(loss_fn, class_weights=class_weights)
    if ddp:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )

    # -- the loop ----------------------------------------------------------------------------------------
    metrics_path = run_dir / METRICS_FILE
    debug_dir = os.environ.get(DEBUG_ANCHORS_ENV)
    images_per_step = parts * cfg.loader.batch_size * world  # nominal, for the progress bar
    bar = None
    if master and not quiet and start_epoch < cfg.epochs:
        from tqdm import tqdm

        bar = tqdm(
            total=(cfg.epochs - start_epoch) * steps_per_epoch * images_per_step,
            unit="img",
            unit_scale=True,
            dynamic_ncols=True,
            file=sys.stderr,
            mininterval=1.0,
        )
    n_terms = len(LOG_TERMS)
    total_steps = cfg.epochs * steps_per_epoch
    lr = learning_rate(cfg, step, total_steps)
    zero = torch.zeros(n_terms, device=device)
    model.train()
    for epoch in range(start_epoch, cfg.epochs):
        t_epoch = t_log = time.time()
        interval_sum, interval_steps, interval_images = zero.clone(), 0, 0  # since the last log line
        epoch_sum, epoch_images, epoch_anchors = zero.clone(), 0, 0
        anchors_seen = [] if debug_dir else None
        if bar is not None:
            bar.set_description(f"epoch {epoch + 1}/{cfg.epochs}")
        for batch in train_loader.epoch(epoch):
            b = batch.size  # triplets in this batch: a host int, no sync
            images = batch.images.contiguous(memory_format=memory_format)  # (parts * b, 3, C, C) float32
            targets = (batch.ages - min_age).clamp_(0, max_age - min_age)  # (parts * b,) class indices, on the device
            lr = learning_rate(cfg, step, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr  # a Python float: no tensor, no sync
            terms = train_step(model, loss_fn, optimizer, ctx, images, targets, cfg.loss, b)
            step += 1
            # Accumulate on the device: no host sync here.
            logged = torch.stack([terms[k].detach() for k in LOG_TERMS])  # (n_terms,)
            interval_sum += logged
            epoch_sum += logged * b
            interval_steps += 1
            interval_images += parts * b
            epoch_images += parts * b
            epoch_anchors += b
            if anchors_seen is not None:
                anchors_seen.append(batch.ids[:b].cpu())  # debug only: a host sync per step
            if bar is not None:
                bar.update(parts * b * world)
            if step % cfg.log_every == 0:
                # Logging: this is a CPU-GPU sync point (the all-reduce and .tolist() wait for the step).
                packed = torch.cat([interval_sum / (interval_steps * world), interval_sum.new_tensor([interval_images])])
                *values, images_now = dist.all_reduce(packed, "sum").tolist()  # means over ranks, images summed
                _check_finite(values, epoch + 1, step - interval_steps + 1, step, ckpt_path, epoch)
                now = time.time()
                row = {"kind": "step", "epoch": epoch + 1, "step": step, **dict(zip(LOG_KEYS, values)), "lr": lr,
                       "images_per_sec": images_now / max(now - t_log, 1e-9)}
                if master:
                    _append_jsonl(metrics_path, row)
                    if bar is not None:
                        bar.set_postfix(loss=f"{row['total']:.3f}", mae=f"{row['train_mae']:.2f}", refresh=False)
                interval_sum.zero_()
                interval_steps, interval_images, t_log = 0, 0, now

        # End of the epoch: this is a CPU-GPU sync point (epoch means, counts over the ranks).
        counts = torch.tensor([epoch_anchors, epoch_images, train_loader.fallback_count], dtype=torch.float64)
        packed = dist.all_reduce(torch.cat([epoch_sum.double(), counts.to(device)]), "sum").tolist()
        anchors, images_done, fallbacks = (int(v) for v in packed[n_terms:])
        means = [v / max(anchors, 1) for v in packed[:n_terms]]  # triplet-weighted epoch means
        _check_finite(means, epoch + 1, step - steps_per_epoch + 1, step, ckpt_path, epoch)
        epoch_time = time.time() - t_epoch
        row = {"kind": "epoch", "epoch": epoch + 1, "step": step, **dict(zip(LOG_KEYS, means)), "lr": lr,
               "images_per_sec": images_done / max(epoch_time, 1e-9), "epoch_time_s": epoch_time,
               "anchors": anchors, "fallback_count": fallbacks}
        if anchors_seen is not None:
            Path(debug_dir).mkdir(parents=True, exist_ok=True)
            np.save(Path(debug_dir) / f"anchors-rank{rank}-epoch{epoch}.npy", torch.cat(anchors_seen).numpy())
        if master:
            _append_jsonl(metrics_path, row)
            # The plain module, never the compiled or DDP wrapper.
            save_checkpoint(ckpt_path, config=cfg, model=raw_model, min_age=min_age, max_age=max_age,
                            template=template, epoch=epoch + 1, step=step, optimizer=optimizer, metrics=row)
            msg = (f"epoch {epoch + 1}/{cfg.epochs}: loss {row['total']:.4f}  train MAE {row['train_mae']:.2f}  "
                   f"{row['images_per_sec']:.0f} img/s  {epoch_time:.1f} s")
            if bar is not None:
                bar.set_postfix(loss=f"{row['total']:.3f}", mae=f"{row['train_mae']:.2f}", refresh=False)
                bar.write(msg, file=sys.stderr)
            else:
                dist.print0(msg)
        if on_epoch_end is not None:
            stop = on_epoch_end(epoch + 1, raw_model)
            raw_model.train()
            if stop:
                break
    if bar is not None:
        bar.close()
    train_time = time.time() - t_start
    del train_loader  # stop the loader's workers / pipeline before the evaluation starts its own

    # -- the test fold: the final epoch's model, on the main process -------------------------------------
    results = None
    run_facts = {"n_train": int(len(train_ids)), "epochs": cfg.epochs, "steps": step, "shards": str(cfg.data.shards),
                 "checkpoint": str(ckpt_path), "train_time_s": train_time, "world_size": world, "config": to_dict(cfg),
                 "machine": machine_facts(device, precision)}
    if master and not has_test:
        # No test fold: the run's product is its checkpoint; results.json says it finished.
        results = {"protocol": protocol, "fold": fold, "folds": n_folds, "n_test": 0, **run_facts}
        write_json(run_dir / RESULTS_FILE, results)
        _plot_curves(run_dir, cfg.name)
        print(f"{run_dir}: trained on all {len(train_ids)} samples of {protocol} (no test fold); model in {ckpt_path}",
              flush=True)
    elif master:
        eval_loader = build_eval_loader(shards, test_ids, cfg.loader, device)
        raw_model.eval()
        preds = ev.predict(raw_model, eval_loader, ctx, min_age=min_age, tta=cfg.test_tta)
        del eval_loader
        m = ev.metrics(preds.expected, preds.ages, preds.identities, preds.features, preds.probs)
        results = ev.write_fold_results(
            run_dir, preds, m, protocol, fold, n_folds=n_folds,
            extra={"mean_age_baseline": baseline, **run_facts},
        )
        _plot_curves(run_dir, cfg.name)
        print(f"{run_dir}: {protocol} fold {fold}: test MAE {m['mae']:.3f}  CS(5) {100 * m['cs5']:.1f}%  "
              f"(mean-age baseline MAE {baseline:.3f}) on {m['n']} test images", flush=True)
    # Every rank waits for the evaluation and gets its results.
    return dist.broadcast_object(results)


def _plot_curves(run_dir: Path, name: str) -> None:
    try:  # a chart must never cost a finished run its result: results.json is already written
        plots.plot_training_curves([run_dir], run_dir / plots.CURVES_PLOT, title=f"{name}: training, per epoch")
    except Exception as e:  # noqa: BLE001
        print(f"{run_dir}: warning: could not draw {plots.CURVES_PLOT} ({type(e).__name__}: {e})", file=sys.stderr)


# --- Every fold of a protocol ----------------------------------------------------------------------


def train_all_folds(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, jobs: int = 1) -> dict:
    """Run every fold of cfg.data.protocol in `<out>/fold-<k>/`, then aggregate them.

    A fold whose results.json exists is skipped, so the command can simply be run again after a
    kill (with --resume, the interrupted fold continues from its checkpoint). `jobs` > 1 trains
    that many folds at once, each in its own process (`_train_folds_at_once`). Returns the
    `agecl.evaluate.aggregate` summary (pooled MAE for LOPO, mean +- std over folds otherwise).
    """
    shards = ShardSet(cfg.data.shards)
    parent = resolve(cfg, shards, fold_dir=True)
    n_folds = int(shards.split(parent.data.protocol).max()) + 1
    pending = []
    for k in range(n_folds):
        fold_cfg = copy.deepcopy(parent)
        fold_cfg.data.fold = k
        fold_cfg.out = str(Path(parent.out) / f"fold-{k}")
        fold_cfg.name = f"{parent.name}-fold{k}"
        # The decision is rank 0's, so every rank takes the same path.
        finished = dist.broadcast_object((Path(fold_cfg.out) / RESULTS_FILE).is_file())
        if finished:
            dist.print0(f"{fold_cfg.out}: fold {k} finished already ({RESULTS_FILE} present); skipped")
        else:
            pending.append(fold_cfg)
    if parent.model.init_from and any(not (Path(c.out) / CHECKPOINT_FILE).is_file() for c in pending):
        finetune.load_source(parent.model.init_from, parent.model.arch)  # a bad source fails once, not once a fold
    if jobs > 1 and pending:
        if dist.env_info().world_size > 1:
            raise TrainError("--jobs runs folds side by side in one process each; it does not combine with torchrun")
        _train_folds_at_once(pending, Path(parent.out), jobs, resume)
    else:
        for fold_cfg in pending:
            train(fold_cfg, resume=resume, quiet=quiet)
            _finish_fold(fold_cfg)
    summary = None
    if dist.is_main():
        summary = ev.aggregate(parent.out, parent.data.protocol, n_folds=n_folds)
        print(ev.report_markdown(summary, title=parent.name))
    return dist.broadcast_object(summary)


def _train_folds_at_once(fold_cfgs: list[TrainConfig], out: Path, jobs: int, resume: bool) -> None:
    """Train the folds `jobs` at a time, one process each, with a progress bar over folds.

    Why: a LOPO fold is a few hundred images, far too little to keep a large GPU busy, and an
    epoch of it is mostly fixed costs; several at once on the same device overlap them. Each
    worker process trains fold after fold (torch, DALI and compiled kernels loaded once), writes
    its output to `<out>/jobs/worker-<pid>.log`, and on a CPU gets its share of the cores. A fold
    that fails is reported with its log; the others finish, and running the command again (with
    --resume) completes the rest.
    """
    import concurrent.futures as cf
    import multiprocessing as mp

    from tqdm import tqdm

    logs = out / "jobs"
    logs.mkdir(parents=True, exist_ok=True)
    threads = max(1, (os.cpu_count() or 1) // jobs)
    failed: dict[int, str] = {}
    print(f"{len(fold_cfgs)} folds, {jobs} at once; worker logs in {logs}", flush=True)
    # spawn, not fork: CUDA, DALI and OpenMP threads do not survive a fork.
    with cf.ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_fold_worker_init,
                                initargs=(str(logs), threads, os.getpid())) as pool:
        futures = {pool.submit(_train_quietly, c, resume): c.data.fold for c in fold_cfgs}
        with tqdm(total=len(futures), desc="folds", unit="fold", dynamic_ncols=True) as bar:
            for future in cf.as_completed(futures):
                k = futures[future]
                try:
                    r = future.result()
                    bar.set_postfix_str(f"fold {k}: MAE {r['test_mae']:.2f}")
                except Exception as e:  # noqa: BLE001: reported below, with every other failure
                    failed[k] = f"{type(e).__name__}: {e}".splitlines()[0]
                bar.update()
    if failed:
        lines = "\n".join(f"  fold {k}: {why}" for k, why in sorted(failed.items()))
        raise TrainError(f"{len(failed)} of {len(fold_cfgs)} folds failed (worker logs in {logs}):\n{lines}\n"
                         "run the same command with --resume to finish them")


def _fold_worker_init(logs: str, threads: int, parent: int) -> None:
    """A fold worker's start: its output to its own log, its share of the CPU threads, and its end
    tied to the parent's: a killed `agecl-train --jobs` (SIGTERM, SIGKILL, a session's end) would
    otherwise leave its workers training on, orphaned, on the cores the next run needs (their
    folds resume from their checkpoints when the command runs again)."""
    if sys.platform == "linux":
        import ctypes
        import signal

        pr_set_pdeathsig = 1  # <sys/prctl.h>: the signal this process gets when its parent exits
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the line above took effect
            os._exit(1)
    log = open(Path(logs) / f"worker-{os.getpid()}.log", "a", buffering=1)
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    sys.stdout = sys.stderr = log
    torch.set_num_threads(threads)


def _train_quietly(cfg: TrainConfig, resume: bool) -> dict:
    print(f"== fold {cfg.data.fold}: {cfg.out}", flush=True)
    result = train(cfg, resume=resume, quiet=True)
    _finish_fold(cfg)
    return result


def _finish_fold(cfg: TrainConfig) -> None:
    """A finished fold is skipped by any later run of the protocol, so its checkpoint keeps the
    model and drops the optimizer state (two thirds of the file)."""
    if dist.is_main():
        drop_optimizer_state(Path(cfg.out) / CHECKPOINT_FILE)


# --- Command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """`agecl-train`: parse, build the config, run one fold or all of them."""
    args = get_args_parser().parse_args(argv)
    cfg = None
    try:
        if args.jobs < 1 or (args.jobs > 1 and not args.all_folds):
            raise ValueError(f"--jobs {args.jobs}: needs --all-folds and a value >= 1")
        cfg = config_from_args(args)
        if args.all_folds:
            train_all_folds(cfg, resume=args.resume, quiet=args.quiet, jobs=args.jobs)
        else:
            train(cfg, resume=args.resume, quiet=args.quiet)
    except (TrainError, CheckpointError, PretrainedError, fmt.FormatError, ValueError, KeyError) as e:
        # Bad input (an unknown key, a foreign checkpoint, a bad shard set): the message, no traceback.
        if args.debug:
            raise
        print(f"agecl-train: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # The disk filled up: the last checkpoint is intact (written atomically), temporaries removed.
        message = disk_full_message(e, cfg.out if cfg is not None and cfg.out else "the run folder", RESUME_HINT)
        if message is None or args.debug:
            raise
        print(f"agecl-train: error: {message}", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print("agecl-train: interrupted; the last finished epoch is in checkpoint.pt: run the same command "
              "with --resume to continue", file=sys.stderr)
        return 130
    finally:
        dist.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main())
