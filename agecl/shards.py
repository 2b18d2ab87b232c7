"""Writing a shard set from aligned samples: tars, DALI indices, the random-access index, splits,
rejects and, last, the manifest.

The builder (`agecl.build`) decides what the samples are; this module only lays them out as
`agecl.format` says. Every file is written atomically, and `manifest.json` is written last and
removed first, so a folder with a manifest is always a complete, consistent set.
"""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from . import format as fmt
from .atomic import atomic_path, write_json, write_text

TAR_MTIME = 0  # fixed member times: the same samples give byte-identical tars
_BLOCK = tarfile.BLOCKSIZE  # 512


@dataclass
class Sample:
    """One aligned face, ready for a shard."""

    age: int  # years
    identity: str
    source: str  # path of the photo relative to the input root (or a virtual path)
    jpeg: bytes  # the aligned IMAGE_SIZE x IMAGE_SIZE RGB face, JPEG-encoded
    meta: dict = field(default_factory=dict)  # more fields for <key>.json: score, points, box ...

    @property
    def key(self) -> str:
        return fmt.make_key(self.age, self.identity, self.source)

    def sort_key(self):
        return (self.age, self.identity, self.source)


@dataclass
class WrittenSamples:
    """What `write_samples` laid out, in shard order (row i = global sample id i)."""

    index: np.ndarray  # INDEX_DTYPE
    identities: list[str]  # index["identity"] indexes this
    sources: Sequence[str]
    keys: Sequence[str] | None  # None where the builder did not keep them (agecl.spill)
    shards: int


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = TAR_MTIME
    info.mode = 0o644
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def write_tar(path: Path, samples: Sequence[Sample]) -> list[list[tuple[str, int, int, str]]]:
    """Write one WebDataset tar atomically; return, per sample, its members as
    (extension, data offset, size, member name), the rows of the DALI index."""
    rows = []
    with atomic_path(path) as tmp:
        with tarfile.open(tmp, "w", format=tarfile.GNU_FORMAT) as tar:
            for s in samples:
                key = s.key
                meta = {"key": key, "age": int(s.age), "identity": s.identity, "source": s.source, **s.meta}
                members = []
                # Sorted extensions keep a sample's members contiguous and in a fixed order.
                for ext, data in ((fmt.IMAGE_EXT, s.jpeg), (fmt.META_EXT, json.dumps(meta, sort_keys=True).encode())):
                    name = f"{key}.{ext}"
                    info, fileobj = _member(name, data)
                    tar.addfile(info, fileobj)
                    # tar.offset is now past the data and its padding to a whole block.
                    padded = -(-len(data) // _BLOCK) * _BLOCK
                    members.append((ext, tar.offset - padded, len(data), name))
                rows.append(members)
    return rows


def dali_index_text(rows: list[list[tuple[str, int, int, str]]]) -> str:
    """A DALI WebDataset index (what DALI's `wds2idx` writes, version v1.2)."""
    lines = [f"v1.2 {len(rows)}"]
    for members in rows:
        lines.append(" ".join(f"{ext} {offset} {size} {name}" for ext, offset, size, name in members))
    return "\n".join(lines) + "\n"


def _begin(out: Path, shard_size: int) -> None:
    """Removes the manifest first: the set is incomplete until `write_manifest`."""
    out.mkdir(parents=True, exist_ok=True)
    (out / fmt.MANIFEST_FILE).unlink(missing_ok=True)
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")


def write_samples(out: Path | str, samples: Iterable[Sample], shard_size: int = 1000, progress=None) -> WrittenSamples:
    """Sort samples by (age, identity, source), write them in shards of `shard_size`, with their
    DALI indices, then `index.npy` and `identities.json`. Removes the manifest first (the set is
    incomplete until `write_manifest`) and any shard left over from a larger earlier build.

    Holds every sample: the builder sorts out of memory (`agecl.spill`) and calls `write_ordered`."""
    out = Path(out)
    _begin(out, shard_size)
    ordered = sorted(samples, key=Sample.sort_key)
    keys = [s.key for s in ordered]
    if len(set(keys)) != len(keys):
        dup = next(k for i, k in enumerate(keys) if k in keys[:i])
        raise ValueError(f"two samples share the key {dup!r}: sources must be unique")
    identities = sorted({s.identity for s in ordered})
    index, shards = write_ordered(out, ordered, len(ordered), identities, shard_size, progress)
    return WrittenSamples(index, identities, [s.source for s in ordered], keys, shards)


def write_ordered(
    out: Path | str, ordered: Iterable[Sample], n: int, identities: Sequence[str], shard_size: int = 1000, progress=None
) -> tuple[np.ndarray, int]:
    """Write n samples that come already in (age, identity, source) order, one shard at a time (a
    shard's samples are all that is held), with their DALI indices, then `index.npy` and
    `identities.json` (`identities`: the sorted distinct identities). Returns (index, shards)."""
    out = Path(out)
    _begin(out, shard_size)
    identity_id = {name: i for i, name in enumerate(identities)}
    index = np.zeros(n, dtype=fmt.INDEX_DTYPE)
    shards = -(-n // shard_size)
    samples = iter(ordered)
    for shard in range(shards):
        lo, hi = shard * shard_size, min(n, (shard + 1) * shard_size)
        batch = list(itertools.islice(samples, hi - lo))
        if len(batch) != hi - lo:
            raise ValueError(f"write_ordered: {lo + len(batch)} samples came, {n} were announced")
        rows = write_tar(fmt.shard_path(out, shard), batch)
        write_text(fmt.dali_index_path(out, shard), dali_index_text(rows))
        for i, (s, members) in enumerate(zip(batch, rows), start=lo):
            _, offset, size, _ = members[0]  # the .jpg member
            index[i] = (shard, offset, size, s.age, identity_id[s.identity])
        del batch, rows  # before the next shard's JPEGs come in
        if progress is not None:
            progress(hi - lo)
    # Shards of an earlier, larger build of this folder would be read by glob-based tools.
    for stale in sorted(out.glob("shard-*.tar")) + sorted(out.glob("shard-*.idx")):
        number = int(stale.stem.split("-")[1])
        if number >= shards:
            stale.unlink()
    with atomic_path(out / fmt.INDEX_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, index)
    write_json(out / fmt.IDENTITIES_FILE, list(identities), indent=None)
    return index, shards


def write_split(out: Path | str, name: str, folds: np.ndarray, info: dict) -> None:
    """Store one protocol split: the fold of every sample (int16, -1 = in no fold) and its description."""
    folds = np.asarray(folds)
    if folds.ndim != 1 or not np.issubdtype(folds.dtype, np.integer):
        raise ValueError(f"split {name!r}: folds must be a 1-d integer array")
    path = fmt.split_path(out, name)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, folds.astype(np.int16))
    write_json(path.with_suffix(".json"), {"name": name, "folds": int(folds.max()) + 1 if len(folds) else 0, **info})


def write_rejects(out: Path | str, rejects: Iterable[dict]) -> int:
    """Write the rejects report, one JSON line per input that did not become a sample
    (at least `source` and `reason`), in source order. Returns the count."""
    rejects = sorted(rejects, key=lambda r: r["source"])
    return write_reject_lines(out, (json.dumps(r, sort_keys=True) for r in rejects))


def write_reject_lines(out: Path | str, lines: Iterable[str | bytes]) -> int:
    """Write the rejects report from its lines (JSON, already in source order, without the
    newline), streaming. Returns the count."""
    count = 0
    with atomic_path(Path(out) / fmt.REJECTS_FILE) as tmp:
        with open(tmp, "wb") as f:
            for line in lines:
                f.write((line.encode() if isinstance(line, str) else line) + b"\n")
                count += 1
    return count


def age_histogram(ages: np.ndarray) -> dict[str, int]:
    """Counts in the paper's Table 1 age groups."""
    ages = np.asarray(ages)
    return {fmt.age_bin_label(lo, hi): int(((ages >= lo) & (ages <= hi)).sum()) for lo, hi in fmt.AGE_BINS}


def jpeg_checksums(out: Path | str, index: np.ndarray) -> np.ndarray:
    """(N,) uint32 CRC-32 of every sample's JPEG as it lies in the shard files of `out`."""
    crcs = np.zeros(len(index), np.uint32)
    for shard in np.unique(index["shard"]):
        data = fmt.shard_path(out, int(shard)).read_bytes()
        for i in np.flatnonzero(index["shard"] == shard):
            o, n = int(index["offset"][i]), int(index["size"][i])
            crcs[i] = zlib.crc32(data[o : o + n])
    return crcs


def write_manifest(out: Path | str, written: WrittenSamples, **fields) -> dict:
    """Write the checksums of the samples as they lie on disk (read back: a byte that changes
    later is caught when the set is opened), then `manifest.json`, last: it marks the set
    complete. `fields` add to (and may override) what is derived from the samples (dataset,
    template, command, versions, splits, ...)."""
    with atomic_path(Path(out) / fmt.CHECKSUMS_FILE) as tmp:
        with open(tmp, "wb") as f:
            np.save(f, jpeg_checksums(out, written.index))
    ages = written.index["age"]
    manifest = {
        "format_version": fmt.FORMAT_VERSION,
        "samples": int(len(written.index)),
        "identities": len(written.identities),
        "shards": written.shards,
        "image_size": fmt.IMAGE_SIZE,
        "min_age": int(ages.min()) if len(ages) else None,
        "max_age": int(ages.max()) if len(ages) else None,
        "age_histogram": age_histogram(ages),
        **fields,
    }
    write_json(Path(out) / fmt.MANIFEST_FILE, manifest)
    return manifest
