"""The offline shard builder: raw photos (or the generated dataset) in, a shard set out.

    inputs (agecl.datasets)      sorted by source, cut into chunks of --chunk-size photos
      └─ per chunk               decode (align.load_photo) → MTCNN (align.FaceDetector) → choose
                                 one face → five-point warp to 256x256 → JPEG
         └─ <out>/.staging/chunk-NNNNN.tar   the chunk's JPEGs + one chunk.json (samples, rejects)
      └─ finalize                every chunk's labels → agecl.spill (sorted out of memory), then
                                 agecl.shards a shard at a time: tars by age, DALI indices, index.npy,
                                 identities.json, splits/, rejects.jsonl, manifest.json (last)

Resuming. Each finished chunk is one tar written atomically (agecl.atomic) into the staging
folder, so a killed run loses at most the chunks in flight. `.staging/settings.json` records what
the chunks depend on (dataset, a hash of the labelled inputs, chunk size, coverage, border, detector
settings, JPEG quality, seed, N for --synthetic); running the same command again skips the
finished chunks, makes the others and finalizes. A run whose settings differ is refused (use
--restart to wipe the staging folder). Every chunk also carries the settings' hash, so a chunk
made with other settings is never mixed in. The staging folder is removed once the manifest is
written (--keep-staging keeps it); a folder with a manifest is complete, and running the command
again says so and exits (--force rebuilds it from scratch).

Several machines (--part i/k, --merge). Chunk j belongs to part (j % k) + 1. A run with
--part i/k makes only its chunks, in its own --out, and stops. Then copy every part's staging
chunks into one folder and finalize there with --merge and the same dataset arguments:

    python tools/make_shards.py --dataset morph --csv morph.csv --out part1 --part 1/2   # machine A
    python tools/make_shards.py --dataset morph --csv morph.csv --out part2 --part 2/2   # machine B
    mkdir -p shards/morph/.staging && rsync -a part1/.staging/ part2/.staging/ shards/morph/.staging/
    python tools/make_shards.py --dataset morph --csv morph.csv --out shards/morph --merge

The result equals that of one run: the chunks are the same whoever makes them. (Byte-identical
JPEGs need the same detector arithmetic: the same device type and library versions.)

Border. Where the aligned crop runs past the photo's edge, --border fills it (align.warp_face):
reflect (the default), replicate or constant (black). The manifest's "template" records the choice
(training copies it into the checkpoint, and agecl-predict / agecl-explain align with it), every
sample's JSON its "outside" share of the frame, and the manifest their histogram ("outside").

Accounting. Every input photo ends as a sample or in rejects.jsonl with a reason: a bad label
(agecl.datasets), a file that does not decode ("missing", "empty-file", "not-an-image",
"truncated", "unreadable", "too-large": align.PhotoError) or no face ("no-face"). The builder
checks inputs == samples + rejects, source by source, before it writes the manifest.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import re
import shlex
import shutil
import sys
import tarfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import __version__
from . import format as fmt
from . import shards, spill, splits
from .atomic import EXIT_DISK_FULL, atomic_path, disk_full_message, write_json
from .datasets import AAF_SPLIT, DATASETS, DatasetError, Inputs, Record, read_dataset

STAGING_DIR = ".staging"
SETTINGS_FILE = "settings.json"
LOCK_FILE = "lock"
CHUNK_PATTERN = "chunk-{:05d}.tar"
CHUNK_META = "chunk.json"  # the first member of a chunk tar; the JPEGs follow as NNNNN.jpg

DEFAULT_CHUNK_SIZE = 64  # photos a chunk: a killed run redoes at most this many per worker
DEFAULT_JPEG_QUALITY = 95
DEFAULT_SHARD_SIZE = 1000  # samples a tar
DEFAULT_FOLDS = 5


class BuildError(RuntimeError):
    """The build cannot go on: settings that differ from the staged ones, missing chunks at merge,
    another build writing into the same folder. The message says what to do."""


# --- what the chunks depend on --------------------------------------------------------------------


@dataclass
class Job:
    """Everything a worker needs to make any chunk; pickled once into each worker process."""

    staging: str
    settings_sha256: str
    dataset: str  # "fgnet", ..., or "synthetic"
    records: list[Record]  # empty for synthetic
    synthetic: int  # N samples of agecl.synthetic, 0 for a real dataset
    seed: int
    chunk_size: int
    coverage: float
    jpeg_quality: int
    detector: object | None  # align.FaceDetector; None for synthetic
    border: str = fmt.DEFAULT_BORDER  # what fills the frame beyond the photo's edge

    @property
    def total(self) -> int:
        return self.synthetic or len(self.records)

    @property
    def chunks(self) -> int:
        return -(-self.total // self.chunk_size)

    def bounds(self, j: int) -> tuple[int, int]:
        return j * self.chunk_size, min(self.total, (j + 1) * self.chunk_size)

    def chunk_path(self, j: int) -> Path:
        return Path(self.staging) / CHUNK_PATTERN.format(j)


def _sha256(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


# --- one chunk --------------------------------------------------------------------------------------


def encode_jpeg(image: np.ndarray, quality: int) -> bytes:
    """(H, W, 3) uint8 RGB -> JPEG bytes; OpenCV with fixed settings, so the same pixels give the
    same bytes."""
    import cv2

    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("cv2.imencode failed on an aligned face")
    return buf.tobytes()


def _points(p: np.ndarray) -> list[list[float]]:
    return [[round(float(x), 2), round(float(y), 2)] for x, y in np.asarray(p).reshape(-1, 2)]


def _load(record: Record):
    """The photo as (H, W, 3) uint8 RGB, or its reject."""
    from .align import PhotoError, load_photo

    try:
        return load_photo(record.path)
    except PhotoError as e:
        return {
            "source": record.source,
            "reason": e.reason,
            "message": f"{record.source}: {e.reason}" + (f" ({e.detail})" if e.detail else ""),
        }


def _map(fn: Callable, items: Sequence, executor) -> list:
    return list(executor.map(fn, items)) if executor is not None else [fn(x) for x in items]


def photo_chunk(job: Job, records: Sequence[Record], loaded: Sequence, executor=None) -> tuple[list, list]:
    """Detect, align and encode one chunk of decoded photos (`loaded`: arrays or reject dicts from
    `_load`). Returns (samples, rejects)."""
    from .align import AlignedFace, align_batch

    samples: list[shards.Sample] = []
    rejects = [x for x in loaded if isinstance(x, dict)]
    ok = [(r, x) for r, x in zip(records, loaded) if not isinstance(x, dict)]
    # One call for the whole chunk: the detector batches photos of equal reduced size.
    results = align_batch(
        [x for _, x in ok], job.detector, fmt.IMAGE_SIZE, job.coverage, [r.source for r, _ in ok], job.border
    )
    faces = [(r, a) for (r, _), a in zip(ok, results) if isinstance(a, AlignedFace)]
    for (r, _), a in zip(ok, results):
        if not isinstance(a, AlignedFace):
            rejects.append({"source": r.source, "reason": a.reason, "message": a.message})
    jpegs = _map(lambda ra: encode_jpeg(ra[1].image, job.jpeg_quality), faces, executor)
    for (r, a), jpeg in zip(faces, jpegs):
        meta = {
            "dataset": job.dataset,
            "score": round(float(a.score), 4),
            "points": _points(a.points),  # the five landmarks in the aligned frame, pixels
            "box": [round(float(v), 1) for v in a.box],  # x1, y1, x2, y2 in the original photo
            "faces": int(a.n_faces),  # faces found in the photo; the chosen one is aligned
            "outside": round(float(a.outside), 3),  # share of the aligned frame beyond the photo's edge
            "fallback": bool(a.fallback),  # found only by the detector's second, larger pass
            **(r.meta or {}),  # labels the dataset gives beyond age and identity (AAF's gender)
        }
        samples.append(shards.Sample(r.age, r.identity, r.source, jpeg, meta))
    return samples, rejects


def synthetic_chunk(job: Job, lo: int, hi: int) -> tuple[list, list]:
    """Samples lo..hi-1 of the generated dataset: already aligned, JPEG-encoded as they are."""
    from . import synthetic

    samples = []
    for s in synthetic.synthetic_samples(job.synthetic, seed=job.seed, start=lo, stop=hi):
        # The same fields as a detected face's: no photo behind it, so no box.
        meta = {"dataset": "synthetic", "score": 1.0, "points": _points(s.points), "box": None, "faces": 1,
                "outside": 0.0, "fallback": False}
        samples.append(shards.Sample(int(s.age), s.identity, s.source, encode_jpeg(s.image, job.jpeg_quality), meta))
    return samples, []


def write_chunk(job: Job, j: int, samples: Sequence[shards.Sample], rejects: Sequence[dict]) -> None:
    """One finished chunk, atomically: chunk.json (labels, meta, rejects) then the JPEGs."""
    lo, hi = job.bounds(j)
    meta = {
        "chunk": j,
        "start": lo,
        "stop": hi,
        "settings_sha256": job.settings_sha256,
        "samples": [{"age": s.age, "identity": s.identity, "source": s.source, "meta": s.meta} for s in samples],
        "rejects": sorted(rejects, key=lambda r: r["source"]),
    }
    members = [(CHUNK_META, json.dumps(meta, sort_keys=True).encode())]
    members += [(f"{i:05d}.jpg", s.jpeg) for i, s in enumerate(samples)]
    with atomic_path(job.chunk_path(j)) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), shards.TAR_MTIME, 0o644
                tar.addfile(info, io.BytesIO(data))


class ChunkError(ValueError):
    """A staging chunk that cannot be read back."""


def read_chunk_meta(path: Path) -> dict:
    """chunk.json of a staged chunk (the first member: cheap to read). Raises ChunkError."""
    try:
        with tarfile.open(path) as tar:
            first = tar.next()
            if first is None or first.name != CHUNK_META:
                raise ChunkError(f"{path}: first member is not {CHUNK_META}")
            return json.loads(tar.extractfile(first).read())
    except (OSError, tarfile.TarError, json.JSONDecodeError, EOFError) as e:
        raise ChunkError(f"{path}: unreadable staging chunk ({e})") from e


def read_chunk(path: Path) -> tuple[dict, list[shards.Sample]]:
    """A staged chunk back as its meta and its Samples. Raises ChunkError."""
    try:
        with tarfile.open(path) as tar:
            data = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
        meta = json.loads(data[CHUNK_META])
        samples = [
            shards.Sample(d["age"], d["identity"], d["source"], data[f"{i:05d}.jpg"], d["meta"])
            for i, d in enumerate(meta["samples"])
        ]
    except (OSError, tarfile.TarError, json.JSONDecodeError, KeyError, EOFError) as e:
        raise ChunkError(f"{path}: unreadable staging chunk ({e})") from e
    return meta, samples


def chunk_contents(path: Path) -> tuple[dict, list[tuple[int, int]]]:
    """chunk.json of a staged chunk and, per sample, where its JPEG lies in the chunk's tar (data
    offset, size): the tar's headers are read, its JPEGs are not. Raises ChunkError."""
    try:
        length = path.stat().st_size
        with tarfile.open(path) as tar:
            first = tar.next()
            if first is None or first.name != CHUNK_META:
                raise ChunkError(f"{path}: first member is not {CHUNK_META}")
            meta = json.loads(tar.extractfile(first).read())
            where = {m.name: (m.offset_data, m.size) for m in tar if m.isfile()}
        jpegs = [where[f"{i:05d}.jpg"] for i in range(len(meta["samples"]))]
    except (OSError, tarfile.TarError, json.JSONDecodeError, KeyError, EOFError) as e:
        raise ChunkError(f"{path}: unreadable staging chunk ({e})") from e
    if any(offset + size > length for offset, size in jpegs):
        raise ChunkError(f"{path}: unreadable staging chunk (cut short at {length} bytes)")
    return meta, jpegs


def make_chunk(job: Job, j: int, loaded: Sequence | None = None, executor=None) -> tuple[int, int, list[str]]:
    """Make and stage chunk j; returns (j, samples, reject reasons) for the progress report."""
    lo, hi = job.bounds(j)
    if job.synthetic:
        samples, rejects = synthetic_chunk(job, lo, hi)
    else:
        records = job.records[lo:hi]
        if loaded is None:
            loaded = _map(_load, records, executor)
        samples, rejects = photo_chunk(job, records, loaded, executor)
    # Accounting, chunk by chunk: every input of the chunk is a sample or a reject.
    if len(samples) + len(rejects) != hi - lo:
        raise RuntimeError(f"chunk {j}: {len(samples)} samples + {len(rejects)} rejects != {hi - lo} inputs")
    write_chunk(job, j, samples, rejects)
    return j, len(samples), [r["reason"] for r in rejects]


# --- running the chunks: in this process, in threads (CUDA) or in worker processes (CPU) ----------

_WORKER_JOB: Job | None = None


def _init_worker(job: Job) -> None:
    """Pool initializer: one thread per process (the pool is the parallelism), the job kept."""
    global _WORKER_JOB
    _WORKER_JOB = job
    import cv2

    cv2.setNumThreads(1)
    if job.detector is not None:
        import torch

        torch.set_num_threads(1)
        job.detector.warm_up()  # this worker's own MTCNN, built once


def _worker_chunk(j: int):
    return make_chunk(_WORKER_JOB, j)


def run_chunks(job: Job, todo: Sequence[int], workers: int, device: str, on_done: Callable) -> None:
    """Make the chunks `todo`, calling on_done(j, samples, reasons) after each.

    cpu, workers > 1: a spawn Pool (safe with torch), each worker with its own detector.
    cuda: detection in this process, batched per chunk; `workers` threads decode the next chunk's
    photos while the GPU works on this one, and encode the JPEGs.
    otherwise: one chunk after the other in this process.
    """
    if not todo:
        return
    if device.startswith("cuda") and job.detector is not None:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(1, workers)) as ex:
            ahead = [ex.submit(_load, r) for r in job.records[slice(*job.bounds(todo[0]))]]
            for n, j in enumerate(todo):
                loaded = [f.result() for f in ahead]
                if n + 1 < len(todo):
                    ahead = [ex.submit(_load, r) for r in job.records[slice(*job.bounds(todo[n + 1]))]]
                on_done(*make_chunk(job, j, loaded, ex))
    elif workers > 1 and len(todo) > 1:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(min(workers, len(todo)), initializer=_init_worker, initargs=(job,)) as pool:
            for result in pool.imap_unordered(_worker_chunk, todo):
                on_done(*result)
    else:
        for j in todo:
            on_done(*make_chunk(job, j))


# --- the staging folder ---------------------------------------------------------------------------


_TMP = re.compile(r"^\..+\.(\d+)\.tmp$")  # agecl.atomic's temporary names: .<name>.<pid>.tmp


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(folder: Path) -> int:
    """Delete temporary files a killed writer left (their process is gone). Returns the count."""
    removed = 0
    for p in list(folder.glob(".*.tmp")) + list(folder.glob(f"{fmt.SPLITS_DIR}/.*.tmp")):
        m = _TMP.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _alive(int(m.group(1))):
            p.unlink(missing_ok=True)
            removed += 1
    return removed


@contextlib.contextmanager
def staging_lock(staging: Path):
    """Refuse a second build writing into the same folder at the same time."""
    import fcntl

    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / LOCK_FILE, "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BuildError(f"{staging.parent}: another make_shards is writing into this folder") from None
        yield


def check_settings(staging: Path, record: dict) -> None:
    """Write the staging folder's settings.json, or check that the staged chunks were made with
    the same settings. Raises BuildError naming what differs."""
    path = staging / SETTINGS_FILE
    if not path.is_file():
        write_json(path, record)
        return
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        old = {}
    if old.get("settings_sha256") == record["settings_sha256"]:
        return
    if not any(staging.glob("chunk-*.tar")):  # nothing was made with the old settings: nothing to keep
        write_json(path, record)
        return
    a, b = old.get("settings", {}), record["settings"]
    differ = [f"{k}: staged {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    raise BuildError(
        f"{staging}: the staged chunks were made with other settings ({'; '.join(differ) or 'settings.json unreadable'}). "
        "Run the same command as before to finish that build, or add --restart to wipe the staging folder and start over."
    )


def staged_chunks(job: Job, warn: Callable[[str], None]) -> set[int]:
    """Chunks already in the staging folder and made with these settings. A chunk that does not
    read back is deleted (it is made again); one made with other settings is an error."""
    done = set()
    for p in sorted(Path(job.staging).glob("chunk-*.tar")):
        try:
            j = int(p.stem.split("-")[1])
            meta = read_chunk_meta(p)
        except (ValueError, ChunkError) as e:
            warn(f"{p}: {e}; it will be made again")
            p.unlink(missing_ok=True)
            continue
        if meta.get("settings_sha256") != job.settings_sha256:
            raise BuildError(
                f"{p}: made with other settings than {Path(job.staging) / SETTINGS_FILE} records "
                "(a part built with other arguments?); remove it or rebuild that part with the same arguments"
            )
        if not 0 <= j < job.chunks or (meta.get("start"), meta.get("stop")) != job.bounds(j):
            raise BuildError(f"{p}: does not belong to this build's {job.chunks} chunks; use --restart")
        done.add(j)
    return done


# --- finalize ----------------------------------------------------------------------------------------


def versions() -> dict:
    """Versions of what made the shards (package metadata: importing torch is not needed)."""
    from importlib import metadata

    def dist(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    import cv2
    import PIL

    return {
        "agecl": __version__,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": dist("torch"),
        "facenet_pytorch": dist("facenet-pytorch"),
        "opencv": cv2.__version__,
        "pillow": PIL.__version__,
    }


def _format_counts(counts: dict) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"


def _write_shards(job: Job, inputs: Inputs | None, out: Path, options: argparse.Namespace,
                  samples: spill.SampleSpill, rejects: spill.Records):
    """The chunks into `samples` and `rejects`, the accounting, then rejects.jsonl and the shards.
    Returns (WrittenSamples, rejects, rejects by reason, inputs, the manifest's "outside" summary)."""
    reasons: Counter = Counter()
    outside = array("d")  # each sample's share of the frame beyond the photo: 8 bytes a sample

    def reject(r: dict) -> None:
        rejects.add(r["source"], json.dumps(r, sort_keys=True).encode())
        reasons[r["reason"]] += 1

    for r in inputs.rejects if inputs is not None else ():
        reject(r)
    for j in range(job.chunks):
        path = job.chunk_path(j)
        try:
            meta, jpegs = chunk_contents(path)
        except ChunkError as e:  # damaged after staging (a bad copy between machines?): remake it
            path.unlink(missing_ok=True)
            raise BuildError(f"{e}; removed: run the same command again (without --merge) to remake it") from None
        if meta.get("settings_sha256") != job.settings_sha256 or meta.get("chunk") != j:
            raise BuildError(f"{path}: made with other settings; use --restart")
        f = samples.add_file(path)
        for d, (offset, size) in zip(meta["samples"], jpegs):
            samples.add(d, f, offset, size)
            outside.append(float(d["meta"].get("outside", 0.0)))
        for r in meta["rejects"]:
            reject(r)

    # Accounting: every input photo is a sample or a reject, source by source. (Not an `assert`:
    # it must hold under python -O too.) Sorted UTF-8 columns, not a Counter of a million strings.
    total = inputs.count if inputs is not None else job.synthetic
    got = np.sort(np.concatenate([samples.sources(), rejects.keys()]))
    if inputs is not None:
        names = [r.source for r in inputs.records] + [r["source"] for r in inputs.rejects]
        expected = np.sort(np.array([spill.utf8(s) for s in names], dtype=bytes)) if names else got[:0]
        same = len(got) == len(expected) and bool(np.all(got == expected))
    else:  # synthetic sources are unique by construction
        same = not np.any(got[1:] == got[:-1])
        expected = got
    if len(samples) + len(rejects) != total or not same:
        lost = [b.decode("utf-8", "surrogatepass") for b in np.setdiff1d(expected, got)[:5].tolist()]
        raise RuntimeError(
            f"accounting failed: {len(samples)} samples + {len(rejects)} rejects != {total} inputs"
            + (f" (e.g. lost: {', '.join(lost)})" if lost else "")
        )
    del got, expected

    n_rejects = shards.write_reject_lines(out, rejects.sorted())
    if not len(samples):
        raise BuildError(f"no photo became a sample: all {n_rejects} are in {out / fmt.REJECTS_FILE}")

    samples.sort()
    bar = _bar(len(samples), "writing shards", options.quiet, unit="sample")
    try:
        index, n_shards = shards.write_ordered(
            out, samples.ordered(options.shard_size), len(samples), samples.identities, options.shard_size, bar.update
        )
    except spill.SpillError as e:  # a staged chunk changed after it was read (the message names it)
        raise BuildError(f"{e}; run the same command again") from None
    finally:
        bar.close()
    written = shards.WrittenSamples(index, samples.identities, [], None, n_shards)
    return written, n_rejects, dict(sorted(reasons.items())), total, outside_histogram(outside)


def finalize(
    job: Job,
    inputs: Inputs | None,
    out: Path,
    options: argparse.Namespace,
    fields: dict,
    warn: Callable[[str], None],
) -> dict:
    """Read every staged chunk, check the accounting, write shards, splits, rejects and, last, the
    manifest. Returns the manifest.

    Memory does not grow with the JPEGs: the chunks' labels go to a spill file and compact
    columns (agecl.spill), sorted there, and the shards are written by reading the JPEGs back from
    the staged chunks one shard at a time."""
    staging = Path(job.staging)
    imports = bool(options.split_file or (inputs is not None and inputs.published_splits))
    with spill.SampleSpill(staging) as samples, spill.Records(staging) as rejects:
        written, n_rejects, reasons, total, outside = _write_shards(job, inputs, out, options, samples, rejects)
        sources = samples.sorted_sources() if imports else None

    ages, identities = written.index["age"], written.index["identity"]
    made: dict[str, tuple[np.ndarray, dict]] = {}
    skipped: dict[str, str] = {}
    for name in splits.splits_for(job.dataset):
        try:
            made[name] = splits.make_split(name, ages, identities, options.folds, options.seed)
        except splits.SplitError as e:  # e.g. 5 folds of a set with 3 persons: the others still help
            skipped[name] = str(e)
            warn(f"warning: split {name!r} not written: {e}")
    imported = [(p.name, p.origin, p.entries, {"fold_meaning": {str(k): v for k, v in p.folds.items()}})
                for p in (inputs.published_splits if inputs is not None else [])]
    if options.split_file:
        imported.append((options.split_name, str(options.split_file), splits.read_split_list(options.split_file), {}))
    for name, origin, entries, extra in imported:
        folds, info = splits.import_split(sources, entries, origin)
        info.update(extra)
        info.update({k: v for k, v in splits.describe(folds, ages, identities).items() if k not in info})
        made[name] = folds, info
        if info["missing"]:
            warn(f"warning: split {name!r}: {info['missing']} sample(s) are not in {origin} (fold -1)")
        if info["unknown"]:
            warn(
                f"warning: split {name!r}: {info['unknown']} name(s) in {origin} match no sample "
                f"(e.g. {', '.join(info['unknown_examples'][:3])})"
            )
    splits_dir = out / fmt.SPLITS_DIR
    if splits_dir.is_dir():  # splits of an earlier build of this folder that this one does not make
        for p in splits_dir.iterdir():
            if p.suffix in (".npy", ".json") and p.stem not in made:
                p.unlink()
    for name, (folds, info) in made.items():
        shards.write_split(out, name, folds, info)

    default = splits.default_protocol(job.dataset)
    if default not in made:  # e.g. kfold of a set with fewer persons than folds
        default = next(iter(made), None)
        warn(f"warning: default protocol is {default!r}: {splits.default_protocol(job.dataset)!r} was not written")
    manifest_fields = {
        **fields,
        "inputs": total,
        "rejects": n_rejects,
        "rejects_by_reason": reasons,
        "outside": outside,
        "default_protocol": default,
        "splits": list(made),
        **({"splits_skipped": skipped} if skipped else {}),
        "seed": options.seed,
        "folds": options.folds,
        "wall_time_s": round(time.monotonic() - options.started, 1),
    }
    return shards.write_manifest(out, written, **manifest_fields)


def outside_histogram(shares: Sequence[float]) -> dict:
    """The manifest's summary of the samples' "outside" shares: counts between format.OUTSIDE_EDGES
    (the last bin includes 1), the mean, and how many exceed 10 % of the frame."""
    x = np.asarray(shares, np.float64)
    counts, _ = np.histogram(x, bins=fmt.OUTSIDE_EDGES)
    return {
        "edges": list(fmt.OUTSIDE_EDGES),
        "counts": counts.tolist(),
        "mean": round(float(x.mean()), 4) if x.size else None,
        "over_10pct": int((x > 0.1).sum()),
    }


# --- the command --------------------------------------------------------------------------------------

EXAMPLES = """\
examples:
  python tools/make_shards.py --dataset fgnet --root data/FGNET/images --out shards/fgnet
  python tools/make_shards.py --dataset morph --csv data/morph/morph_2008_nonCommercial.csv --out shards/morph
  python tools/make_shards.py --dataset utkface --root data/UTKFace --out shards/utkface --device cuda --workers 8
  python tools/make_shards.py --dataset aaf --root data/aaf/images --out shards/aaf --border constant
  python tools/make_shards.py --dataset csv --csv labels.csv --path-column file --age-column age \\
      --identity-column person --out shards/mine
  python tools/make_shards.py --synthetic 2000 --out shards/synthetic
  python tools/make_shards.py --combine shards/fgnet shards/aaf --out shards/fgnet+aaf   # finished sets, as one
  python tools/make_shards.py --dataset fgnet --root data/FGNET/images --out shards/fgnet \\
      --split-file lists/fgnet_lopo.txt --split-name paper

resuming: run the same command again. Finished chunks are kept in <out>/.staging and skipped;
  a run with other settings is refused (--restart wipes the staging folder). A complete set (with
  manifest.json) is reported and left alone (--force rebuilds it).

several machines: chunk j belongs to part (j % k) + 1.
  machine A:  make_shards.py <dataset args> --out part1 --part 1/2
  machine B:  make_shards.py <dataset args> --out part2 --part 2/2
  then:       mkdir -p out/.staging && rsync -a part1/.staging/ part2/.staging/ out/.staging/
              make_shards.py <dataset args> --out out --merge

photos: files ending in .jpg .jpeg .png .bmp .tif .tiff .webp (any case); other files are ignored.
Every photo ends in a shard or in <out>/rejects.jsonl with its reason.

exit status: 0 done (or already complete); 2 bad arguments, inputs or staging folder; 75 out of
  disk space or over the file-size limit (the message names the file: free space and run the same
  command again; finished chunks are kept); 130 interrupted. --debug shows tracebacks.
"""


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="make_shards.py",
        description="Detect, align and pack face photos into agecl shards (WebDataset tars grouped by age, "
        "DALI indices, index.npy, protocol splits, rejects report, manifest).",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("input")
    src.add_argument("--dataset", choices=DATASETS, help="reader of the raw dataset")
    src.add_argument("--root", help="photo folder (morph, csv: base of relative paths; default the CSV's folder)")
    src.add_argument("--csv", help="label file (morph: the album CSV; csv: path, age, identity columns)")
    src.add_argument("--path-column", help="CSV column of the photo path (default: morph 'photo', csv 'path')")
    src.add_argument("--age-column", help="CSV column of the age in years (default 'age')")
    src.add_argument("--identity-column", help="CSV column of the person (default: morph 'id_num', csv 'identity')")
    src.add_argument("--synthetic", type=int, default=0, metavar="N", help="build the generated dataset of N samples instead")
    src.add_argument("--combine", nargs="+", metavar="SHARDS",
                     help="one set made of finished shard sets (no detection): identities and sources prefixed by "
                     "each set's folder name, each set's splits carried as <set>-<split> (see agecl.combine)")
    outg = p.add_argument_group("output")
    outg.add_argument("--out", required=True, help="shard folder to write")
    outg.add_argument("--shard-size", type=int, default=DEFAULT_SHARD_SIZE, help="samples a tar (default %(default)s)")
    outg.add_argument("--jpeg-quality", type=int, default=DEFAULT_JPEG_QUALITY, help="JPEG quality 1-100 (default %(default)s)")
    outg.add_argument("--coverage", type=float, default=fmt.DEFAULT_COVERAGE,
                      help="crop side / ArcFace crop side (default %(default)s: forehead and chin in view)")
    outg.add_argument("--border", choices=fmt.BORDERS, default=fmt.DEFAULT_BORDER,
                      help="what fills the aligned crop beyond the photo's edge: reflect (mirror the photo), "
                      "replicate (repeat its edge pixels) or constant (black) (default %(default)s)")
    outg.add_argument("--seed", type=int, default=0, help="seed of the splits and of --synthetic (default %(default)s)")
    outg.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="folds of rs, se, kfold (default %(default)s)")
    outg.add_argument("--split-file", help="a published split list: lines 'file_name fold' or 'file_name,fold'")
    outg.add_argument("--split-name", help="name of the imported split (default: the list's file stem)")
    from .align import FaceDetector  # numpy, OpenCV and Pillow only: torch loads on first detection

    det = p.add_argument_group("detection")
    det.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto (default: cuda when there is a GPU)")
    det.add_argument("--detect-size", type=int, default=FaceDetector.detect_size,
                     help="longest side of the copy MTCNN sees (default %(default)s)")
    det.add_argument("--min-face", type=int, default=FaceDetector.min_face,
                     help="smallest face searched, pixels of that copy (default %(default)s)")
    run = p.add_argument_group("running")
    run.add_argument("--workers", type=int, default=1,
                     help="cpu: worker processes, each with its own detector; cuda: decode threads (default %(default)s)")
    run.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE,
                     help="photos a staged chunk, the unit of resuming and of --part (default %(default)s)")
    run.add_argument("--part", metavar="I/K", help="make only part I of K of the chunks (see 'several machines')")
    run.add_argument("--merge", action="store_true", help="finalize from a staging folder holding every part's chunks")
    run.add_argument("--restart", action="store_true", help="wipe the staging folder and start over")
    run.add_argument("--force", action="store_true", help="rebuild a complete set from scratch")
    run.add_argument("--keep-staging", action="store_true", help="keep <out>/.staging after the manifest is written")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--debug", action="store_true", help="show the traceback of an error instead of its message")
    return p


def _bar(total: int, desc: str, quiet: bool, initial: int = 0, unit: str = "photo"):
    """A tqdm bar on stderr: count, rate and ETA."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=sys.stderr, disable=quiet, dynamic_ncols=True)


def _parse_part(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise BuildError(f"--part {text!r}: expected I/K with 1 <= I <= K, e.g. 1/4")
    return int(m.group(1)), int(m.group(2))


def _check_options(o: argparse.Namespace) -> None:
    if bool(o.dataset) + bool(o.synthetic) + bool(o.combine) != 1:
        raise BuildError("give one of --dataset, --synthetic N or --combine SHARDS ...")
    if o.synthetic < 0:
        raise BuildError(f"--synthetic {o.synthetic}: must be a positive count")
    if o.seed < 0:
        raise BuildError(f"--seed {o.seed}: must be non-negative")
    for name, value, lo, hi in (
        ("--jpeg-quality", o.jpeg_quality, 1, 100),
        ("--shard-size", o.shard_size, 1, None),
        ("--chunk-size", o.chunk_size, 1, None),
        ("--folds", o.folds, 2, None),
        ("--workers", o.workers, 1, None),
        ("--detect-size", o.detect_size, 32, None),
        ("--min-face", o.min_face, 12, None),
    ):
        if value < lo or (hi is not None and value > hi):
            raise BuildError(f"{name} {value}: must be {f'{lo}-{hi}' if hi else f'at least {lo}'}")
    if not o.coverage > 0:
        raise BuildError(f"--coverage {o.coverage}: must be positive")
    if o.merge and o.part:
        raise BuildError("--merge finalizes every part's chunks: give it without --part")
    if o.split_name and not o.split_file:
        raise BuildError("--split-name needs --split-file")
    if o.split_file:
        o.split_name = o.split_name or Path(o.split_file).stem
        splits.check_split_name(o.split_name)
        if o.dataset == "aaf" and o.split_name == AAF_SPLIT:
            raise BuildError(f"split name {o.split_name!r} is AAF's own split (written from its lists); choose another --split-name")


def _resolve_device(device: str) -> str:
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    if device != "cpu" and not device.startswith("cuda"):
        raise BuildError(f"--device {device!r}: expected cpu, cuda, cuda:N or auto")
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise BuildError(f"--device {device}: no CUDA GPU is visible")
    return device


def _combine(o: argparse.Namespace, out: Path, log) -> int:
    from . import combine

    if o.part or o.merge or o.split_file:
        raise BuildError("--combine copies finished sets: it takes no --part, --merge or --split-file")
    try:
        named = combine.open_sets(o.combine, out)
    except combine.CombineError as e:
        raise BuildError(str(e)) from None
    total = sum(len(s) for _, s in named)
    with _bar(total, "combine", o.quiet, unit="face") as bar:
        manifest = combine.combine(named, out, shard_size=o.shard_size, command=o.command, progress=bar.update)
    log(f"{out}: {manifest['samples']} samples of {len(named)} sets ("
        + ", ".join(f"{name} {len(s)}" for name, s in named) + f"), splits {', '.join(manifest['splits'])}")
    return 0


def build(o: argparse.Namespace) -> int:
    """Run the builder with parsed options; returns the exit status. See the module docstring."""
    o.started = time.monotonic()

    def warn(msg: str) -> None:  # warnings print even with --quiet
        print(msg, file=sys.stderr)

    def log(msg: str) -> None:
        if not o.quiet:
            print(msg, file=sys.stderr)

    _check_options(o)
    part = _parse_part(o.part)
    out = Path(o.out)
    if o.combine:
        return _combine(o, out, log)

    # 1. Inputs and labels: every error about the dataset as a whole comes before any work.
    inputs: Inputs | None = None
    if o.synthetic:
        from . import synthetic

        try:
            synthetic.synthetic_labels(o.synthetic, o.seed)  # raises on an impossible N
        except ValueError as e:
            raise BuildError(f"--synthetic {o.synthetic}: {e}") from None
        dataset = "synthetic"
    else:
        inputs = read_dataset(o.dataset, o.root, o.csv, o.path_column, o.age_column, o.identity_column)
        dataset = inputs.dataset
    if o.split_file and inputs is not None:
        # A list that matches no photo is an error now, not after an hour of detection.
        splits.import_split([r.source for r in inputs.records], splits.read_split_list(o.split_file), o.split_file)

    # 2. What the chunks depend on.
    detector = None
    if inputs is not None:
        from .align import FaceDetector

        detector = FaceDetector(device="cpu", detect_size=o.detect_size, min_face=o.min_face)
    settings = {
        "format_version": fmt.FORMAT_VERSION,
        "dataset": dataset,
        "synthetic": o.synthetic or None,
        "seed": o.seed,
        "inputs": inputs.count if inputs else o.synthetic,
        "inputs_sha256": inputs.digest() if inputs else None,
        "chunk_size": o.chunk_size,
        "image_size": fmt.IMAGE_SIZE,
        "coverage": o.coverage,
        # Only when not the default, so that sets and staging folders made before --border existed
        # (all reflected) keep their settings hash and stay complete or resumable.
        **({"border": o.border} if o.border != fmt.DEFAULT_BORDER else {}),
        "detector": detector.settings() if detector else None,
        "jpeg_quality": o.jpeg_quality,
    }
    settings_sha256 = _sha256(settings)
    split_options = {"folds": o.folds, "split_file": o.split_file and Path(o.split_file).name, "split_name": o.split_name}

    # 3. A complete set is left alone.
    if (out / fmt.MANIFEST_FILE).is_file() and not o.force:
        manifest = fmt.load_manifest(out)
        same = manifest.get("build", {}).get("settings_sha256") == settings_sha256 and manifest.get("build", {}).get(
            "split_options"
        ) == split_options
        if not same:
            raise BuildError(
                f"{out} holds a complete shard set built from other inputs or settings "
                f"(dataset {manifest.get('dataset')!r}, {manifest.get('samples')} samples); "
                "add --force to rebuild it, or choose another --out"
            )
        print(f"{out}: complete ({manifest['samples']} samples, {manifest['identities']} identities, "
              f"{manifest.get('rejects', 0)} rejects); nothing to do (--force rebuilds it)")
        return 0

    staging = out / STAGING_DIR
    with staging_lock(staging):
        if o.restart or o.force:
            for p in staging.iterdir():
                if p.name != LOCK_FILE:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            (out / fmt.MANIFEST_FILE).unlink(missing_ok=True)
        check_settings(staging, {
            "settings": settings,
            "settings_sha256": settings_sha256,
            "root": str(Path(inputs.root).resolve()) if inputs else None,
            **(inputs.extra if inputs else {}),
        })
        for folder in (staging, out):
            n = remove_stale_temps(folder)
            if n:
                log(f"removed {n} temporary file(s) left by a killed run in {folder}")

        job = Job(
            staging=str(staging),
            settings_sha256=settings_sha256,
            dataset=dataset,
            records=inputs.records if inputs else [],
            synthetic=o.synthetic,
            seed=o.seed,
            chunk_size=o.chunk_size,
            coverage=o.coverage,
            jpeg_quality=o.jpeg_quality,
            detector=detector,
            border=o.border,
        )
        done = staged_chunks(job, warn)
        mine = [j for j in range(job.chunks) if part is None or j % part[1] == part[0] - 1]
        todo = [] if o.merge else [j for j in mine if j not in done]
        if o.merge:
            missing = [j for j in range(job.chunks) if j not in done]
            if missing:
                shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
                raise BuildError(
                    f"{staging}: {len(missing)} of {job.chunks} chunks are missing (chunks {shown}); copy every "
                    "part's .staging here, or run without --merge to make the missing chunks here"
                )
        if done and todo:
            log(f"resuming: {len(set(mine) & done)} of {len(mine)} chunks already staged in {staging}")

        # 4. The work.
        if todo:
            device = _resolve_device(o.device) if detector is not None else "cpu"
            if detector is not None:
                detector.device = device
            size = lambda js: sum(job.bounds(j)[1] - job.bounds(j)[0] for j in js)  # noqa: E731
            bar = _bar(size(mine), f"{dataset} {'part %d/%d' % part if part else ''}".strip(), o.quiet, size(set(mine) & done))
            reasons: Counter = Counter()

            def on_done(j: int, n_samples: int, chunk_reasons: list[str]) -> None:
                reasons.update(chunk_reasons)
                lo, hi = job.bounds(j)
                bar.update(hi - lo)
                if reasons:
                    bar.set_postfix_str("rejects: " + _format_counts(dict(sorted(reasons.items()))), refresh=False)

            try:
                run_chunks(job, todo, o.workers, device, on_done)
            finally:
                bar.close()
            done |= set(todo)

        if len(done) < job.chunks and part is not None:
            print(
                f"part {part[0]}/{part[1]}: its {len(mine)} chunks are staged in {staging}; "
                f"{job.chunks - len(done)} chunks of other parts are not here yet. Copy every part's .staging "
                f"into one folder and run with --merge to write the shards."
            )
            return 0

        # 5. Shards, splits, rejects, manifest.
        fields = {
            "dataset": dataset,
            **({"root": inputs.root} if inputs else {}),
            **({k: v for k, v in inputs.extra.items()} if inputs else {}),
            **({"ignored_files": inputs.ignored} if inputs else {}),
            **({"identity_note": inputs.identity_note} if inputs and inputs.identity_note else {}),
            "template": {
                "size": fmt.IMAGE_SIZE,
                "coverage": o.coverage,
                "border": o.border,
                "points": np.round(fmt.face_template(fmt.IMAGE_SIZE, o.coverage).astype(np.float64), 2).tolist(),
            },
            "detector": settings["detector"] or {"model": None, "note": "synthetic: generated already aligned"},
            "jpeg_quality": o.jpeg_quality,
            "shard_size": o.shard_size,
            "chunk_size": o.chunk_size,
            "versions": versions(),
            "command": o.command,
            "build": {
                "settings_sha256": settings_sha256,
                "inputs_sha256": settings["inputs_sha256"],
                "split_options": split_options,
            },
        }
        manifest = finalize(job, inputs, out, o, fields, warn)
        if not o.keep_staging:
            shutil.rmtree(staging, ignore_errors=True)

    print(summary(out, manifest))
    return 0


def summary(out: Path, m: dict) -> str:
    """The closing report: counts, rejects by reason, where things are."""
    lines = [
        f"{m['dataset']}: {m['samples']} samples of {m['inputs']} photos, {m['identities']} identities, "
        f"ages {m['min_age']}-{m['max_age']}",
        f"rejects: {m['rejects']} ({_format_counts(m['rejects_by_reason'])})",
        *([f"border {m['template'].get('border', fmt.DEFAULT_BORDER)}: mean {100 * m['outside']['mean']:.1f}% of the "
           f"frame beyond the photo's edge; {m['outside']['over_10pct']} samples over 10%"] if m.get("outside") else []),
        f"{m['shards']} shard(s) in {out}; splits: {', '.join(m['splits']) or 'none'} (default {m['default_protocol']})",
        f"rejects report: {out / fmt.REJECTS_FILE}; manifest: {out / fmt.MANIFEST_FILE}",
        f"wall time {m['wall_time_s']:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point (tools/make_shards.py)."""
    parser = get_args_parser()
    args = parser.parse_args(argv)
    args.command = shlex.join(sys.argv if argv is None else ["make_shards.py", *argv])
    try:
        return build(args)
    except (BuildError, DatasetError, splits.SplitError, fmt.FormatError) as e:
        if args.debug:
            raise
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        # The disk filled up (or a file size limit was hit): finished chunks are kept, temporaries removed.
        message = disk_full_message(e, args.out, "run the same command again: finished chunks are kept")
        if message is None or args.debug:
            raise
        print(f"make_shards: error: {message}", file=sys.stderr)
        return EXIT_DISK_FULL
    except KeyboardInterrupt:
        print(f"make_shards: interrupted; finished chunks are kept in {Path(args.out) / STAGING_DIR}: "
              "run the same command again to resume", file=sys.stderr)
        return 130
