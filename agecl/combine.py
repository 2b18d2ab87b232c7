"""One shard set made of finished ones: `tools/make_shards.py --combine A B --out C`.

Why: a run trains on one shard set's split, and fine-tuning on a small set (FG-NET) while
replaying faces of a larger one (All-Age-Faces) needs both in one set. Nothing is detected,
aligned or re-encoded: each sample's JPEG bytes and JSON record are copied as they are.

- A sample's identity and source get its set's name as a prefix, "<set>/": people of two sets
  never count as one person. The set's name is its folder's name (names must differ).
- The sets must share the face template (size, coverage, landmark points, border): faces of one
  set must be aligned like the other's.
- Every split of every set is carried as "<set>-<split>", with the other sets' samples in no fold
  (-1). A split that mixes the sets (e.g. one set's folds, the other's faces in every training
  part, `format.EVERY_TRAIN_PART`) is then written with `agecl.shards.write_split`.
- The samples stream through: each set is already in (age, identity, source) order, the prefix
  keeps that order within a set, and a k-way merge of the sets writes one shard at a time.
"""

from __future__ import annotations

import heapq
import time
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from . import format as fmt
from . import shards
from .reader import ShardSet

# Manifest fields every set must agree on: what a face in a shard looks like.
_TEMPLATE_FIELDS = ("size", "coverage", "points", "border")


class CombineError(ValueError):
    """The sets cannot be combined: the message names the set and the reason."""


def _template(s: ShardSet) -> dict:
    t = dict(s.manifest.get("template") or {})
    t.setdefault("border", fmt.template_border(t))  # sets made before borders were recorded: reflect
    t.setdefault("size", int(s.manifest.get("image_size", fmt.IMAGE_SIZE)))
    return {k: t.get(k) for k in _TEMPLATE_FIELDS}


def open_sets(roots: Sequence[Path | str], out: Path | str) -> list[tuple[str, ShardSet]]:
    """(name, set) of every root, checked: distinct names, one template, none of them is `out`."""
    if len(roots) < 2:
        raise CombineError(f"--combine needs two shard sets or more, got {len(roots)}")
    named = [(Path(r).resolve().name, ShardSet(r)) for r in roots]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise CombineError(f"--combine: two sets have the same folder name ({', '.join(names)}): a sample's set is named by it")
    out = Path(out).resolve()
    for name, s in named:
        if s.root.resolve() == out:
            raise CombineError(f"--combine: {s.root} is also --out")
    first = named[0][1]
    for name, s in named[1:]:
        a, b = _template(first), _template(s)
        if a != b:
            diff = ", ".join(f"{k} {a[k]} against {b[k]}" for k in _TEMPLATE_FIELDS if a[k] != b[k])
            raise CombineError(f"{s.root}: its faces are aligned to another template than {first.root}'s ({diff})")
    return named


def _samples(name: str, s: ShardSet) -> Iterator[shards.Sample]:
    """Set `s`'s samples in order, renamed into the combined set, checked to come sorted."""
    previous = None
    for i in range(len(s)):
        record = s.meta(i)
        age, identity, source = int(s.ages[i]), s.identity_names[int(s.identities[i])], str(record.get("source", ""))
        if int(record.get("age", age)) != age or str(record.get("identity", identity)) != identity:
            raise fmt.FormatError(f"{s.sample_name(i)}: its JSON record says age {record.get('age')}, identity "
                                  f"{record.get('identity')!r}; the index says {age}, {identity!r}")
        extra = {k: v for k, v in record.items() if k not in ("key", "age", "identity", "source")}
        sample = shards.Sample(age=age, identity=f"{name}/{identity}", source=f"{name}/{source}",
                               jpeg=s.jpeg(i).tobytes(), meta={**extra, "set": name, "set_key": record.get("key")})
        if previous is not None and sample.sort_key() < previous:
            raise fmt.FormatError(f"{s.sample_name(i)}: the set is not in (age, identity, source) order")
        previous = sample.sort_key()
        yield sample


def combine(
    named: Sequence[tuple[str, ShardSet]],
    out: Path | str,
    *,
    shard_size: int = 1000,
    command: str = "",
    progress: Callable[[int], None] | None = None,
) -> dict:
    """Write the combined set of `named`, the checked sets `open_sets` returns, into `out` (see the
    module docstring); returns its manifest.

    The manifest is removed first and written last, as every build does: a killed run leaves a
    folder without one, and running the command again rewrites it whole.
    """
    started = time.monotonic()
    out = Path(out)
    n = sum(len(s) for _, s in named)
    identities = sorted(f"{name}/{i}" for name, s in named for i in s.identity_names)
    merged = heapq.merge(*(_samples(name, s) for name, s in named), key=shards.Sample.sort_key)
    index, n_shards = shards.write_ordered(out, merged, n, identities, shard_size, progress)
    # Where each set's samples went: the merge keeps a set's order, so the set's k-th sample is
    # the k-th of the combined rows whose identity carries its name.
    names = [name for name, _ in named]
    set_of_identity = np.array([names.index(i.split("/", 1)[0]) for i in identities], np.int64)
    set_of_row = set_of_identity[index["identity"]]
    rows_by_set = [np.flatnonzero(set_of_row == k) for k in range(len(named))]
    carried = []
    splits_dir = out / fmt.SPLITS_DIR
    if splits_dir.is_dir():  # splits of an earlier build of this folder
        for p in splits_dir.iterdir():
            if p.suffix in (".npy", ".json"):
                p.unlink()
    for (name, s), rows in zip(named, rows_by_set):
        for split_file in sorted((s.root / fmt.SPLITS_DIR).glob("*.npy")):
            folds = np.full(n, fmt.NOT_IN_SPLIT, np.int16)
            folds[rows] = s.split(split_file.stem)
            carried_name = f"{name}-{split_file.stem}"
            shards.write_split(out, carried_name, folds, {"protocol": carried_name, "from": str(split_file),
                                                          "rule": f"{name}'s split; the other sets' samples in no fold"})
            carried.append(carried_name)
    first = named[0][1]
    default = first.manifest.get("default_protocol")
    written = shards.WrittenSamples(index, identities, [], None, n_shards)
    return shards.write_manifest(
        out,
        written,
        dataset="combined",
        sources=[{"set": name, "root": str(s.root), "dataset": s.manifest.get("dataset"), "samples": len(s),
                  "identities": len(s.identity_names)} for name, s in named],
        template=first.manifest.get("template"),
        default_protocol=f"{named[0][0]}-{default}" if default else (carried[0] if carried else None),
        splits=carried,
        command=command,
        wall_time_s=round(time.monotonic() - started, 1),
    )
