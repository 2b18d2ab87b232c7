"""Faults survived, counted: kill, fill the disk, corrupt and diverge agecl's commands many times.

    python benchmarks/faults.py                     # every fault kind, the full trial counts
    python benchmarks/faults.py --scale 0.1 --kinds kill-build,disk-checkpoint

Each fault kind is injected `trials` times (seeded draws) into the real commands (make_shards,
agecl-train, agecl-predict, agecl-export), on a small FG-NET subset when ../shared/data/fgnet is
there, else on the synthetic set. Each command runs in a child forked from this process (the
imports are paid once); a kill is SIGKILL to the child's process group; a full disk is
RLIMIT_FSIZE in the child, so that writes past a drawn size fail with EFBIG part-way.

Outcome of a trial, one JSON line per fault kind with the counts:
- survived: after the fault, the same command run again (once there is room, for a full disk)
  ends with a result identical to an uninterrupted run's (shard files byte for byte; weights,
  optimizer state and predictions exactly), or, for corruption and divergence, never applies;
- clean_errors: the faulty command ended with one clear message (no traceback) that names what
  it must (the file; the sample of a shard; the epoch and step of a divergence) and the status
  the --help documents;
- tracebacks: a command printed a Python traceback (any run of the trial);
- half_written: a file under its final name (not a .tmp) that does not read back whole, checked
  after every fault (tars end in their end-of-archive blocks, npy/npz/json/jsonl/idx/pt/images
  load);
- lost: samples missing from a rebuilt shard set (inputs not accounted for as sample or reject);
- other: trials that were none of the above (e.g. a corruption that went unnoticed), with the
  first few reasons.
Target: every trial survived or a clean error; 0 tracebacks, 0 half-written files, 0 samples lost.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import sys
import tarfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402  (imported once here; every command runs in a child forked from this process)

from agecl import build, export, predict  # noqa: E402
from agecl import train as train_cli  # noqa: E402
from agecl.atomic import EXIT_DISK_FULL  # noqa: E402

FGNET = ROOT.parent / "shared" / "data" / "fgnet" / "images"
TRACEBACK = "Traceback (most recent call last)"
CLEAN_FAILURE = 2  # the commands' documented status for bad input


# --- running a command in a forked child ----------------------------------------------------------


@dataclass
class Run:
    rc: int | None  # None: killed
    output: str
    seconds: float
    killed: bool = False
    killed_at: float | None = None

    @property
    def traceback(self) -> bool:
        return TRACEBACK in self.output


def run(main: Callable, argv: list[str], *, fsize: int | None = None, trigger: Callable[[float], bool] | None = None,
        delay: float = 0.0, timeout: float = 600.0) -> Run:
    """`main(argv)` in a forked child (its own process group, one torch thread), its stdout and
    stderr captured through a pipe (not a file: the size limit must not cut the message). With
    `trigger`, the child's group gets SIGKILL `delay` seconds after trigger(elapsed) first holds."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            os.close(r)
            os.setpgid(0, 0)
            os.dup2(w, 1)
            os.dup2(w, 2)
            torch.set_num_threads(1)
            if fsize is not None:
                resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
            code = main(argv)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # what the interpreter would print for an uncaught exception
            traceback.print_exc()
            code = 1
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(code if isinstance(code, int) else 1)
    os.close(w)
    os.set_blocking(r, False)
    out = bytearray()
    t0 = time.monotonic()
    fired, killed, killed_at, status = None, False, None, 0
    while True:
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(r, 1 << 16):
                out += chunk
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        now = time.monotonic() - t0
        if trigger is not None and fired is None and trigger(now):
            fired = now
        if (fired is not None and now >= fired + delay) or now > timeout:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed, killed_at = True, now
            break
        time.sleep(0.002)
    with contextlib.suppress(BlockingIOError, OSError):
        while chunk := os.read(r, 1 << 16):
            out += chunk
    os.close(r)
    rc = None if killed else os.waitstatus_to_exitcode(status)
    return Run(rc, out.decode(errors="replace"), time.monotonic() - t0, killed, killed_at)


def in_child(fn: Callable, *args):
    """fn(*args) in a forked child, its (picklable) result back: torch work (loading, comparing)
    never runs in this process, so that no OpenMP pool exists when the next command forks."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            torch.set_num_threads(1)
            try:
                payload = pickle.dumps(("ok", fn(*args)))
            except BaseException as e:  # noqa: BLE001
                payload = pickle.dumps(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
            with os.fdopen(w, "wb") as f:
                f.write(payload)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    kind, value = pickle.loads(data)
    if kind == "error":
        raise RuntimeError(value)
    return value


# --- whole files under their final names ----------------------------------------------------------


def _check_file(p: Path) -> None:
    """Raise if `p` does not read back whole."""
    suffix = p.suffix.lower()
    if suffix == ".tar":
        data = p.read_bytes()
        # tarfile accepts a tar cut at a member boundary; a whole one ends in two zero blocks.
        if len(data) % 512 or data[-1024:] != bytes(1024):
            raise ValueError("no end-of-archive blocks")
        with tarfile.open(p) as tar:
            for m in tar.getmembers():
                if m.isfile():
                    tar.extractfile(m).read()
    elif suffix == ".npy":
        np.load(p, allow_pickle=False)
    elif suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            for k in z.files:
                z[k]
    elif suffix == ".json":
        json.loads(p.read_text())
    elif suffix == ".jsonl":
        text = p.read_text()
        if text and not text.endswith("\n"):
            raise ValueError("last line cut short")
        for line in text.splitlines():
            json.loads(line)
    elif suffix == ".idx":
        lines = p.read_text().splitlines()
        head = lines[0].split()
        if head[0] != "v1.2" or int(head[1]) != len(lines) - 1:
            raise ValueError("DALI index cut short")
    elif suffix == ".pt" and p.name == train_cli.CHECKPOINT_FILE:
        from agecl.checkpoint import load_checkpoint

        load_checkpoint(p)
    elif suffix in (".png", ".jpg", ".jpeg"):
        from PIL import Image

        with Image.open(p) as im:
            im.load()
    elif suffix == ".ts":
        torch.jit.load(str(p))
    elif suffix == ".pt2":
        torch.export.load(str(p))
    elif suffix == ".onnx":
        import onnx

        onnx.load(str(p))


def half_written(folder: Path) -> list[str]:
    """Files under `folder` that sit under their final name (not agecl.atomic's .*.tmp) and do not
    read back whole."""
    bad = []
    if not folder.exists():
        return bad
    for p in sorted(folder.rglob("*")):
        if not p.is_file() or (p.name.startswith(".") and p.name.endswith(".tmp")):
            continue
        try:
            _check_file(p)
        except Exception as e:  # noqa: BLE001
            bad.append(f"{p}: {type(e).__name__}: {str(e)[:120]}")
    return bad


# --- comparing results ----------------------------------------------------------------------------

_VOLATILE = {"wall_time_s", "command", "train_time_s", "checkpoint", "shards"}


def _strip(d):
    if isinstance(d, dict):
        return {k: _strip(v) for k, v in d.items() if k not in _VOLATILE and k != "out" and k != "name"}
    if isinstance(d, list):
        return [_strip(v) for v in d]
    return d


def same_shards(ref: Path, got: Path) -> tuple[bool, str, int]:
    """(identical, why not, samples lost). Identical: the same files, byte for byte, except the
    manifest's wall time and command."""
    names = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())  # noqa: E731
    a, b = names(ref), names(got)
    lost = 0
    if (got / "manifest.json").is_file():
        mr, mg = (json.loads((d / "manifest.json").read_text()) for d in (ref, got))
        lost = max(0, (mr["samples"] + mr["rejects"]) - (mg["samples"] + mg["rejects"]))
    if a != b:
        return False, f"files differ: {sorted(set(a) ^ set(b))[:5]}", lost
    for name in a:
        if name == "manifest.json":
            if _strip(json.loads((ref / name).read_text())) != _strip(json.loads((got / name).read_text())):
                return False, "manifest differs", lost
        elif (ref / name).read_bytes() != (got / name).read_bytes():
            return False, f"{name} differs", lost
    return True, "", lost


def same_run(ref: Path, got: Path) -> tuple[bool, str]:
    """A training run folder against the reference: weights, optimizer state, epoch and step of
    the checkpoint exactly; results.json (less times and paths) and predictions.npz exactly."""
    from agecl.checkpoint import load_checkpoint

    a, b = (load_checkpoint(d / train_cli.CHECKPOINT_FILE) for d in (ref, got))
    if (a["epoch"], a["step"]) != (b["epoch"], b["step"]):
        return False, f"checkpoint at epoch {b['epoch']} step {b['step']}, reference {a['epoch']} {a['step']}"
    for k, v in a["model"].items():
        if not torch.equal(v, b["model"][k]):
            return False, f"weights differ ({k})"
    if pickle.dumps(_tensors(a["optimizer"])) != pickle.dumps(_tensors(b["optimizer"])):
        return False, "optimizer state differs"
    ra, rb = (json.loads((d / train_cli.RESULTS_FILE).read_text()) for d in (ref, got))
    if _strip(ra) != _strip(rb):
        return False, f"results differ: test MAE {rb.get('test_mae')} vs {ra.get('test_mae')}"
    with np.load(ref / "predictions.npz") as za, np.load(got / "predictions.npz") as zb:
        if za.files != zb.files or any(not np.array_equal(za[k], zb[k]) for k in za.files):
            return False, "predictions differ"
    return True, ""


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        return obj.numpy().tobytes()
    if isinstance(obj, dict):
        return {k: _tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_tensors(v) for v in obj]
    return obj


def same_folds(ref: Path, got: Path) -> tuple[bool, str]:
    folds = sorted(p.name for p in ref.glob("fold-*"))
    for f in folds:
        ok, why = same_run(ref / f, got / f)
        if not ok:
            return False, f"{f}: {why}"
    return True, ""


# --- the setting: data, commands, references -------------------------------------------------------


class Setting:
    """The data and the reference (uninterrupted) runs every trial is compared with."""

    def __init__(self, work: Path, synthetic: bool):
        self.work = work
        work.mkdir(parents=True, exist_ok=True)
        self.photos = None
        if not synthetic and FGNET.is_dir():
            # 9 people x 5 photos: three subject-exclusive folds of three people.
            self.photos = work / "fgnet"
            if not self.photos.is_dir():
                self.photos.mkdir()
                files = sorted(p for p in FGNET.iterdir() if p.suffix.lower() == ".jpg")
                for person in sorted({p.name[:3] for p in files})[:9]:
                    for p in [p for p in files if p.name[:3] == person][:5]:
                        os.symlink(p, self.photos / p.name)
            self.data = "fgnet subset (9 people, 45 photos)"
        else:
            self.data = "synthetic (48 samples)"
        self.ref_shards = work / "ref-shards"
        self.ref_run = work / "ref-run"
        self.ref_folds = work / "ref-folds"
        self.times: dict[str, float] = {}

    def build_argv(self, out: Path) -> list[str]:
        src = ["--dataset", "fgnet", "--root", str(self.photos)] if self.photos else ["--synthetic", "48"]
        return [*src, "--out", str(out), "--folds", "3", "--chunk-size", "8", "--shard-size", "16", "--workers", "1",
                "--device", "cpu", "--quiet"]

    def train_argv(self, out: Path, shards: Path | None = None, epochs: int = 2, extra=()) -> list[str]:
        return ["--shards", str(shards or self.ref_shards), "--protocol", "kfold", "--epochs", str(epochs),
                "--image-size", "32", "--set", "loader.image_size=32", "--batch-size", "8", "--device", "cpu",
                "--precision", "fp32", "--compile", "off", "--loader", "dali", "--workers", "1", "--log-every", "2",
                "--out", str(out), "--resume", "--quiet", *extra]

    def folds_argv(self, out: Path) -> list[str]:
        return self.train_argv(out, epochs=1, extra=["--all-folds"])

    def predict_argv(self, annotate: Path) -> list[str]:
        photos = sorted(self.photos.iterdir())[:4] if self.photos else []
        return [*map(str, photos), "--checkpoint", str(self.ref_run / train_cli.CHECKPOINT_FILE), "--device", "cpu",
                "--json", "--annotate", str(annotate), "--quiet"]

    def export_argv(self, folder: Path) -> list[str]:
        return ["--checkpoint", str(self.ref_run / train_cli.CHECKPOINT_FILE), "--torchscript", str(folder / "age.ts"),
                "--export", str(folder / "age.pt2"), "--onnx", str(folder / "age.onnx")]

    def prepare(self, kinds: list[str]) -> None:
        """The reference runs the kinds need, each timed (the kill draws are spread over these times)."""
        needs_train = any(k.startswith(("kill-train", "disk-checkpoint", "disk-annotate", "disk-export",
                                        "corrupt-checkpoint", "corrupt-config", "diverge")) for k in kinds)
        refs = [(self.ref_shards, build.main, self.build_argv(self.ref_shards), "build")]
        if needs_train:
            refs.append((self.ref_run, train_cli.main, self.train_argv(self.ref_run), "train"))
        if "kill-all-folds" in kinds:
            refs.append((self.ref_folds, train_cli.main, self.folds_argv(self.ref_folds), "folds"))
        for path, main, argv, key in refs:
            shutil.rmtree(path, ignore_errors=True)
            r = run(main, argv)
            if r.rc != 0:
                raise SystemExit(f"reference {key} failed:\n{r.output[-3000:]}")
            self.times[key] = r.seconds
        if needs_train:
            # The epoch-1 state of the reference run: what a later checkpoint write must not destroy.
            self.after_epoch1 = self.work / "after-epoch1"
            shutil.rmtree(self.after_epoch1, ignore_errors=True)
            r = run(train_cli.main, self.train_argv(self.after_epoch1),
                    trigger=lambda _: (self.after_epoch1 / train_cli.CHECKPOINT_FILE).is_file())
            assert r.killed, r.output[-2000:]
        self.ref_annotate = self.work / "ref-annotate"
        if self.photos and "disk-annotate" in kinds:
            shutil.rmtree(self.ref_annotate, ignore_errors=True)
            r = run(predict.main, self.predict_argv(self.ref_annotate))
            assert r.rc == 0, r.output[-3000:]
            self.ref_predict_output = r.output
            self.times["predict"] = r.seconds
        self.ref_export = self.work / "ref-export"
        if "disk-export" in kinds:
            shutil.rmtree(self.ref_export, ignore_errors=True)
            self.ref_export.mkdir()
            r = run(export.main, self.export_argv(self.ref_export))
            assert r.rc == 0, r.output[-3000:]
            self.times["export"] = r.seconds


# --- the trials ------------------------------------------------------------------------------------


@dataclass
class Tally:
    kind: str
    trials: int = 0
    survived: int = 0
    clean_errors: int = 0
    tracebacks: int = 0
    half_written: int = 0
    lost: int = 0
    other: int = 0
    notes: list = field(default_factory=list)
    seconds: float = 0.0

    def note(self, text: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(text[:300])

    def row(self) -> dict:
        return {"fault": self.kind, "trials": self.trials, "survived": self.survived, "clean_errors": self.clean_errors,
                "tracebacks": self.tracebacks, "half_written": self.half_written, "samples_lost": self.lost,
                "other": self.other, "seconds": round(self.seconds, 1), **({"notes": self.notes} if self.notes else {})}


def _fresh(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)
    return path


def _count_runs(t: Tally, *runs: Run) -> None:
    for r in runs:
        if r.traceback:
            t.tracebacks += 1
            t.note("traceback: " + r.output[r.output.find(TRACEBACK):][-400:])


def _check_half(t: Tally, folder: Path) -> None:
    bad = in_child(half_written, folder)
    if bad:
        t.half_written += len(bad)
        t.note("half-written: " + bad[0])


def _kill_and_rerun(t: Tally, main: Callable, argv: list[str], out: Path, trigger, delay: float = 0.0) -> tuple[Run, Run]:
    """`main(argv)` into a fresh `out`, killed when `trigger` holds (then `delay` s); count the
    half-written files it left, run the same command again, count the tracebacks of both runs."""
    _fresh(out)
    first = run(main, argv, trigger=trigger, delay=delay)
    _check_half(t, out)
    again = run(main, argv)
    _count_runs(t, first, again)
    return first, again


def kill_build(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _, again = _kill_and_rerun(t, build.main, s.build_argv(out), out,
                               lambda now, d=rng.uniform(0, s.times["build"]): now >= d)
    ok, why, lost = in_child(same_shards, s.ref_shards, out)
    t.lost += lost
    if again.rc == 0 and ok and not (out / build.STAGING_DIR).exists():
        t.survived += 1
    else:
        t.other += 1
        t.note(f"rebuild rc {again.rc}: {why} {again.output[-300:]}")


def _kill_train(s: Setting, t: Tally, out: Path, trigger, delay: float) -> Run:
    first, again = _kill_and_rerun(t, train_cli.main, s.train_argv(out), out, trigger, delay)
    ok, why = in_child(same_run, s.ref_run, out) if again.rc == 0 else (False, again.output[-300:])
    if ok:
        t.survived += 1
    else:
        t.other += 1
        t.note(f"resumed run rc {again.rc}: {why}")
    return first


def kill_train_step(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    # From the first logged step (training under way) to a drawn moment up to two epochs later.
    metrics = out / train_cli.METRICS_FILE
    _kill_train(s, t, out, lambda _: metrics.is_file() and metrics.stat().st_size > 0,
                rng.uniform(0, 0.6 * s.times["train"]))


def kill_train_checkpoint(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    # The moment a checkpoint temporary appears (epoch 1 or 2), then a few milliseconds.
    first = _kill_train(s, t, out, lambda _: any(out.glob(".checkpoint.pt.*.tmp")), rng.uniform(0, 0.05))
    if not first.killed:
        t.note("run ended before the kill")


def kill_train_eval(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    # After the final checkpoint is in place (its second version), during the test-fold evaluation.
    seen: set[int] = set()
    ckpt = out / train_cli.CHECKPOINT_FILE

    def final_checkpoint(_):
        with contextlib.suppress(FileNotFoundError):
            seen.add(ckpt.stat().st_ino)
        return len(seen) >= 2

    _kill_train(s, t, out, final_checkpoint, rng.uniform(0, 0.25 * s.times["train"]))


def kill_folds(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _, again = _kill_and_rerun(t, train_cli.main, s.folds_argv(out), out,
                               lambda now, d=rng.uniform(0, s.times["folds"]): now >= d)
    ok, why = in_child(same_folds, s.ref_folds, out) if again.rc == 0 else (False, again.output[-300:])
    if ok and (out / "results.md").is_file():
        t.survived += 1
    else:
        t.other += 1
        t.note(f"rerun rc {again.rc}: {why}")


def _largest_file(folder: Path) -> int:
    return max(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _disk_full_message(r: Run, t: Tally) -> bool:
    ok = r.rc == EXIT_DISK_FULL and not r.traceback and "Free space in" in r.output and "cannot write" in r.output
    if not ok:
        t.note(f"full-disk run rc {r.rc}: {r.output[-300:]}")
    return ok


def _score_disk_trial(t: Tally, clean: bool, same: bool, why: str) -> None:
    """Count a full-disk trial: its first run ended in a clean error (`clean`), and the same
    command run again with room gave the reference result (`same`; otherwise `why` is noted)."""
    t.clean_errors += clean
    if same:
        t.survived += 1
    elif not clean:
        t.other += 1
    if not same:
        t.note(why)


def disk_build(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _fresh(out)
    limit = int(np.exp(rng.uniform(np.log(2048), np.log(_largest_file(s.ref_shards) - 1))))
    first = run(build.main, s.build_argv(out), fsize=limit)
    clean = _disk_full_message(first, t)
    _check_half(t, out)
    again = run(build.main, s.build_argv(out))
    _count_runs(t, first, again)
    ok, why, lost = in_child(same_shards, s.ref_shards, out)
    t.lost += lost
    _score_disk_trial(t, clean, again.rc == 0 and ok, f"rebuild: {why}")


def disk_checkpoint(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _fresh(out)
    from_epoch1 = rng.random() < 0.5  # half the trials: an epoch-1 checkpoint exists and must survive
    if from_epoch1:
        shutil.copytree(s.after_epoch1, out)
    ckpt_size = (s.ref_run / train_cli.CHECKPOINT_FILE).stat().st_size
    limit = int(rng.uniform(1 << 20, ckpt_size - 1))
    first = run(train_cli.main, s.train_argv(out), fsize=limit)
    clean = _disk_full_message(first, t) and "checkpoint.pt" in first.output
    _check_half(t, out)
    if from_epoch1:
        kept = in_child(lambda: __import__("agecl.checkpoint").checkpoint.load_checkpoint(out / "checkpoint.pt")["epoch"])
        if kept != 1:
            clean = False
            t.note(f"the epoch-1 checkpoint was not kept (epoch {kept})")
    again = run(train_cli.main, s.train_argv(out))
    _count_runs(t, first, again)
    ok, why = in_child(same_run, s.ref_run, out) if again.rc == 0 else (False, again.output[-300:])
    _score_disk_trial(t, clean, ok, f"resumed: {why}")


def disk_annotate(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _fresh(out)
    limit = int(rng.uniform(1024, _largest_file(s.ref_annotate) - 1))
    first = run(predict.main, s.predict_argv(out), fsize=limit)
    clean = _disk_full_message(first, t)
    _check_half(t, out)
    again = run(predict.main, s.predict_argv(out))
    _count_runs(t, first, again)
    names = lambda d: sorted(p.name for p in d.rglob("*") if p.is_file())  # noqa: E731
    same = again.rc == 0 and again.output == s.ref_predict_output and names(out) == names(s.ref_annotate) and all(
        (out / n).read_bytes() == (s.ref_annotate / n).read_bytes() for n in names(out))
    _score_disk_trial(t, clean, same, f"rerun rc {again.rc}: output or annotations differ")


def disk_export(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    _fresh(out).mkdir(parents=True)
    limit = int(rng.uniform(1024, _largest_file(s.ref_export) - 1))
    first = run(export.main, s.export_argv(out), fsize=limit)
    clean = _disk_full_message(first, t)
    _check_half(t, out)
    again = run(export.main, s.export_argv(out))
    _count_runs(t, first, again)
    sidecars = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    verified = again.rc == 0 and len(sidecars) == 3 and all(m["verification"]["passed"] for m in sidecars)
    _score_disk_trial(t, clean, verified, f"rerun rc {again.rc}: {again.output[-300:]}")


def _clean_error(t: Tally, r: Run, *must: str, before_training: Path | None = None) -> None:
    """A corrupted input: a clean error (status 2, no traceback) naming `must`; with
    `before_training`, no training time was spent (no checkpoint, no metrics in that folder)."""
    _count_runs(t, r)
    missing = [m for m in must if m not in r.output]
    spent = before_training is not None and any(
        (before_training / f).exists() for f in (train_cli.CHECKPOINT_FILE, train_cli.METRICS_FILE))
    if r.rc == CLEAN_FAILURE and not r.traceback and not missing and not spent:
        t.clean_errors += 1
    else:
        t.other += 1
        t.note(f"rc {r.rc}, missing {missing}, training started {spent}: {r.output[-300:]}")


def _corrupt_copy(s: Setting, out: Path) -> Path:
    shards = _fresh(out) / "shards"
    shutil.copytree(s.ref_shards, shards)
    return shards


def corrupt_jpeg(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    shards = _corrupt_copy(s, out)
    index = np.load(shards / "index.npy")
    i = rng.randrange(len(index))
    # Inside the JPEG, not its first or last two bytes (markers the cheap check already reads).
    o, n = int(index["offset"][i]), int(index["size"][i])
    path = shards / f"shard-{int(index['shard'][i]):05d}.tar"
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(o + 2, o + n - 2)] ^= rng.randint(1, 255)
    path.write_bytes(bytes(data))
    run_dir = out / "run"
    _clean_error(t, run(train_cli.main, s.train_argv(run_dir, shards)), path.name, f"sample {i} ",
                 before_training=run_dir)


def corrupt_tar(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    shards = _corrupt_copy(s, out)
    tars = sorted(shards.glob("shard-*.tar"))
    path = rng.choice(tars)
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(rng.randrange(0, size - 1024))  # at least into the last sample
    run_dir = out / "run"
    _clean_error(t, run(train_cli.main, s.train_argv(run_dir, shards)), path.name, "sample",
                 before_training=run_dir)


def corrupt_index(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    shards = _corrupt_copy(s, out)
    (shards / "index.npy").unlink()
    run_dir = out / "run"
    _clean_error(t, run(train_cli.main, s.train_argv(run_dir, shards)), "index.npy", before_training=run_dir)


def corrupt_checkpoint(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    run_dir = _fresh(out) / "run"
    shutil.copytree(s.after_epoch1, run_dir)
    ckpt = run_dir / train_cli.CHECKPOINT_FILE
    how = rng.choice(["truncated", "foreign", "random bytes", "other version"])
    if how == "truncated":
        with open(ckpt, "r+b") as f:
            f.truncate(rng.randrange(0, ckpt.stat().st_size))
    elif how == "random bytes":
        ckpt.write_bytes(rng.randbytes(rng.randint(1, 4096)))
    else:
        def write(path, how, seed):
            g = torch.Generator().manual_seed(seed)
            if how == "foreign":  # e.g. torchvision backbone weights where a checkpoint should be
                torch.save({"conv1.weight": torch.randn(4, 3, 3, 3, generator=g)}, path)
            else:
                from agecl.checkpoint import load_checkpoint

                c = load_checkpoint(path)
                c.pop("path")
                c["version"] = 99
                torch.save(c, path)
        in_child(write, ckpt, how, rng.randrange(1 << 30))
    before = ckpt.read_bytes()
    r = run(train_cli.main, s.train_argv(run_dir))
    _clean_error(t, r, str(ckpt))
    if ckpt.read_bytes() != before:
        t.note(f"{how}: the refused checkpoint was overwritten")
        t.half_written += 1


def corrupt_config(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    """`--config` with a config.json of another agecl version (keys it does not know)."""
    _fresh(out).mkdir(parents=True)
    cfg = json.loads((s.ref_run / train_cli.CONFIG_FILE).read_text())
    how = rng.choice(["new top-level key", "new section key", "renamed key", "section of another shape"])
    if how == "new top-level key":
        cfg["schedule_warmup"] = 5
    elif how == "new section key":
        cfg["loader"]["mixup"] = 0.2
    elif how == "renamed key":
        cfg["loss"]["lambda_mean"] = cfg["loss"].pop(next(iter(cfg["loss"])))
    else:
        cfg["model"] = "resnet18"
    path = out / "config.json"
    path.write_text(json.dumps(cfg))
    run_dir = out / "run"
    argv = ["--config", str(path), "--out", str(run_dir), "--quiet"]
    _clean_error(t, run(train_cli.main, argv), str(path), before_training=run_dir)


def diverge(s: Setting, t: Tally, rng: random.Random, out: Path) -> None:
    """A learning rate that blows the loss up: stopped with the epoch and step named, the last
    good checkpoint intact. Half the trials resume a good epoch-1 run with a blowing-up rate
    (--set lr is refused by the configuration check, so the checkpoint's lr is edited instead)."""
    run_dir = _fresh(out) / "run"
    # Adam steps of this size overflow float32 weights; from about 3.4e37 torch's Adam itself raises
    # (its step size lr / (1 - beta1) does not fit a float32), which is not what is measured here.
    lr = 10 ** rng.uniform(33, 36)
    from_epoch1 = rng.random() < 0.5
    if from_epoch1:
        shutil.copytree(s.after_epoch1, run_dir)

        def set_lr(path, lr):
            from agecl.checkpoint import load_checkpoint

            c = load_checkpoint(path)
            c.pop("path")
            c["config"]["lr"] = lr
            for g in c["optimizer"]["param_groups"]:
                g["lr"] = lr
            torch.save(c, path)
        in_child(set_lr, run_dir / train_cli.CHECKPOINT_FILE, lr)
        before = (run_dir / train_cli.CHECKPOINT_FILE).read_bytes()
    seed = [] if from_epoch1 else ["--seed", str(rng.randrange(100))]  # the seed must match a resumed run's
    r = run(train_cli.main, s.train_argv(run_dir, extra=["--lr", repr(lr), *seed]))
    _count_runs(t, r)
    named = r.rc == CLEAN_FAILURE and "non-finite" in r.output and "epoch " in r.output and "step" in r.output
    kept = (run_dir / train_cli.CHECKPOINT_FILE).read_bytes() == before if from_epoch1 else not (
        run_dir / train_cli.CHECKPOINT_FILE).exists()
    _check_half(t, run_dir)
    if named and kept and not r.traceback:
        t.clean_errors += 1
    else:
        t.other += 1
        t.note(f"lr {lr:.3g} from epoch 1 {from_epoch1}: rc {r.rc}, checkpoint kept {kept}: {r.output[-300:]}")


KINDS = {  # name: (function, trials at scale 1)
    "kill-build": (kill_build, 20),
    "kill-train-step": (kill_train_step, 10),
    "kill-train-checkpoint": (kill_train_checkpoint, 10),
    "kill-train-eval": (kill_train_eval, 10),
    "kill-all-folds": (kill_folds, 20),
    "disk-build": (disk_build, 20),
    "disk-checkpoint": (disk_checkpoint, 10),
    "disk-annotate": (disk_annotate, 20),
    "disk-export": (disk_export, 8),
    "corrupt-jpeg": (corrupt_jpeg, 30),
    "corrupt-tar": (corrupt_tar, 20),
    "corrupt-index": (corrupt_index, 10),
    "corrupt-checkpoint": (corrupt_checkpoint, 20),
    "corrupt-config": (corrupt_config, 12),
    "diverge": (diverge, 10),
}


def run_suite(work: Path, kinds: list[str], scale: float, seed: int, synthetic: bool, log=print) -> list[dict]:
    s = Setting(work, synthetic)
    t0 = time.monotonic()
    s.prepare(kinds)
    log(json.dumps({"setting": s.data, "reference_seconds": {k: round(v, 1) for k, v in s.times.items()},
                    "prepare_seconds": round(time.monotonic() - t0, 1)}), flush=True)
    rows = []
    for kind in kinds:
        fn, n = KINDS[kind]
        if kind == "disk-annotate" and s.photos is None:
            continue  # the synthetic set has no photos to detect faces in
        tally = Tally(kind)
        rng = random.Random(f"{seed}-{kind}")
        t1 = time.monotonic()
        for k in range(max(1, round(n * scale))):
            fn(s, tally, rng, work / "trial")
            tally.trials += 1
        tally.seconds = time.monotonic() - t1
        rows.append(tally.row())
        log(json.dumps(rows[-1]), flush=True)
    shutil.rmtree(work / "trial", ignore_errors=True)
    total = {k: sum(r[k] for r in rows) for k in ("trials", "survived", "clean_errors", "tracebacks", "half_written",
                                                   "samples_lost", "other")}
    log(json.dumps({"fault": "all", **total}), flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/agecl-faults", help="scratch folder (data, references, trials)")
    p.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated fault kinds (default all: {', '.join(KINDS)})")
    p.add_argument("--scale", type=float, default=1.0, help="multiply every kind's trial count (at least 1 each)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--synthetic", action="store_true", help="the synthetic set even when FG-NET is there")
    args = p.parse_args(argv)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        p.error(f"unknown fault kinds {unknown}; known: {', '.join(KINDS)}")
    rows = run_suite(Path(args.work), kinds, args.scale, args.seed, args.synthetic)
    bad = sum(r["tracebacks"] + r["half_written"] + r["samples_lost"] + r["other"] for r in rows)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
