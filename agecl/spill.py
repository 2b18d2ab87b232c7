"""Sorting a build's samples and rejects with memory that does not hold them: the final pass of
the shard builder at a million faces.

The builder's staged chunks are in input order; a shard set is in (age, identity, source) order.
Instead of holding every sample (its JPEG, its meta) to sort them, the builder records each one
here as it reads the chunks:

- its labels and meta as one pickled record appended to an unlinked temporary file (`Records`);
- its JPEG as a place: (staged file, data offset, size), left where it is;
- what the order needs, in compact columns: age, identity number, the source as UTF-8 bytes.

About 50 bytes a sample plus the source's length stay in memory. `SampleSpill.sort()` orders the
columns (np.lexsort; UTF-8 byte order is code point order, so it equals Python's order of the
strings), and `ordered(batch)` reads the samples back in that order, one batch at a time: a shard
of JPEGs is the most held at once. `Records.sorted()` streams the rejects in source order the same
way. Both temporary files vanish when closed or when the process dies.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from array import array
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from . import format as fmt
from .shards import Sample


class SpillError(RuntimeError):
    """A JPEG is no longer where the spill recorded it (its staged file changed or went away)."""


def utf8(text: str) -> bytes:
    """The bytes whose order is the string's order ('surrogatepass': lone surrogates that a
    non-UTF-8 file name decodes to keep their code point order too)."""
    return text.encode("utf-8", "surrogatepass")


def byte_column(data: bytearray | bytes, ends: array) -> np.ndarray:
    """(n,) fixed-width bytes array of the n strings packed in `data`, string i ending at ends[i]."""
    n = len(ends)
    ends_np = np.frombuffer(ends, np.int64) if n else np.zeros(0, np.int64)
    starts = np.concatenate(([0], ends_np[:-1])) if n else ends_np
    width = max(1, int((ends_np - starts).max()) if n else 1)
    out = np.zeros(n, f"S{width}")
    step = 1 << 16  # a list of this many bytes objects at a time, not of all n
    for lo in range(0, n, step):
        s, e = starts[lo : lo + step].tolist(), ends_np[lo : lo + step].tolist()
        out[lo : lo + len(s)] = [bytes(data[a:b]) for a, b in zip(s, e)]
    return out


class Utf8Column(Sequence):
    """A read-only sequence of str over a fixed-width bytes array (decoded on access)."""

    def __init__(self, column: np.ndarray):
        self._column = column

    def __len__(self) -> int:
        return len(self._column)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [b.decode("utf-8", "surrogatepass") for b in self._column[i].tolist()]
        return self._column[i].decode("utf-8", "surrogatepass")


class Records:
    """Byte records appended to an unlinked temporary file in `folder`, each with a sort key (a
    str); read back by number or all in key order. Memory: the keys' bytes and 8 bytes a record."""

    def __init__(self, folder: Path | str):
        self._file = tempfile.TemporaryFile(dir=folder, prefix=".spill-")
        self._fd = self._file.fileno()
        self._size = 0
        self._ends = array("q")  # where each record ends in the file
        self._keys = bytearray()
        self._key_ends = array("q")
        self._buffer: list[bytes] = []  # records not yet written: one write() per many records
        self._buffered = 0

    def __len__(self) -> int:
        return len(self._ends)

    def add(self, key: str, data: bytes) -> int:
        """Append one record; returns its number."""
        self._buffer.append(data)
        self._buffered += len(data)
        self._size += len(data)
        self._ends.append(self._size)
        self._keys += utf8(key)
        self._key_ends.append(len(self._keys))
        if self._buffered >= 1 << 20:
            self._flush()
        return len(self._ends) - 1

    def _flush(self) -> None:
        if self._buffer:
            self._file.write(b"".join(self._buffer))
            self._buffer, self._buffered = [], 0
            self._file.flush()

    def keys(self) -> np.ndarray:
        """(n,) the records' keys as fixed-width UTF-8 bytes, in record order."""
        return byte_column(self._keys, self._key_ends)

    def read(self, i: int) -> bytes:
        self._flush()
        end = self._ends[i]
        start = self._ends[i - 1] if i else 0
        data = os.pread(self._fd, end - start, start)
        if len(data) != end - start:
            raise OSError(f"spill file: record {i} cut short")
        return data

    def sorted(self) -> Iterator[bytes]:
        """Every record, in (key, record number) order."""
        for i in np.argsort(self.keys(), kind="stable").tolist():
            yield self.read(i)

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class SampleSpill:
    """The samples of a build, in compact columns and a spill file, sorted and read back in shard
    order (see the module docstring).

        spill = SampleSpill(folder)
        f = spill.add_file(chunk_path)
        spill.add({"age": .., "identity": .., "source": .., "meta": {..}}, f, offset, size)  # each sample
        spill.sort()          # ValueError when two samples share a key
        for s in spill.ordered(batch=shard_size): ...   # shards.Sample, in shard order
    """

    def __init__(self, folder: Path | str):
        self._records = Records(folder)  # keyed by source: the accounting reads those keys
        self._files: list[str] = []  # where the JPEGs are
        self._age = array("q")
        self._identity = array("i")  # number in order of first appearance (renumbered by sort())
        self._file = array("i")
        self._offset = array("q")
        self._size = array("q")
        self._key_hash = array("q")  # hash(key): duplicate keys are found among equal hashes
        self._identity_number: dict[str, int] = {}
        self._identity_names: list[str] = []
        self.order: np.ndarray | None = None  # (n,) int64 record numbers in shard order
        self.identities: list[str] = []  # sorted distinct identities (after sort())

    def __len__(self) -> int:
        return len(self._age)

    def add_file(self, path: Path | str) -> int:
        self._files.append(str(path))
        return len(self._files) - 1

    def add(self, sample: dict, file: int, offset: int, size: int) -> None:
        """One sample: its chunk.json entry (age, identity, source, meta) and where its JPEG lies."""
        age, identity, source = int(sample["age"]), sample["identity"], sample["source"]
        number = self._identity_number.get(identity)
        if number is None:
            number = self._identity_number[identity] = len(self._identity_names)
            self._identity_names.append(identity)
        # pickle, not JSON: a third of the time both ways, and the same dict comes back.
        self._records.add(source, pickle.dumps(sample, protocol=pickle.HIGHEST_PROTOCOL))
        self._age.append(age)
        self._identity.append(number)
        self._file.append(file)
        self._offset.append(offset)
        self._size.append(size)
        self._key_hash.append(hash(fmt.make_key(age, identity, source)))

    def sources(self) -> np.ndarray:
        """(n,) sources as fixed-width UTF-8 bytes, in the order added."""
        return self._records.keys()

    def sort(self) -> None:
        """Order the samples by (age, identity, source) and number the identities in sorted order.
        Raises ValueError when two samples share a key (as `shards.write_samples` does)."""
        names = self._identity_names
        by_name = sorted(range(len(names)), key=names.__getitem__)
        rank = np.empty(len(names), np.int64)
        rank[by_name] = np.arange(len(names))
        self.identities = [names[i] for i in by_name]
        identity = rank[np.frombuffer(self._identity, np.int32)] if len(self) else np.zeros(0, np.int64)
        self._identity = identity.astype(np.int32)  # now in sorted-name numbers
        ages = np.frombuffer(self._age, np.int64) if len(self) else np.zeros(0, np.int64)
        self.order = np.lexsort((self.sources(), identity, ages))
        self._check_keys()

    def _check_keys(self) -> None:
        hashes = np.frombuffer(self._key_hash, np.int64) if len(self) else np.zeros(0, np.int64)
        by_hash = np.argsort(hashes, kind="stable")
        same = np.flatnonzero(hashes[by_hash][1:] == hashes[by_hash][:-1])
        if not len(same):
            return
        # Equal hashes: compare the real keys. The error names the first clash in shard order.
        position = np.empty(len(self), np.int64)
        position[self.order] = np.arange(len(self))
        seen: dict[str, int] = {}
        clashes = []
        for i in sorted(set(by_hash[same].tolist()) | set(by_hash[same + 1].tolist()), key=position.__getitem__):
            key = self.key(i)
            if key in seen:
                clashes.append(key)
            seen[key] = i
        if clashes:
            raise ValueError(f"two samples share the key {clashes[0]!r}: sources must be unique")

    def sample_dict(self, i: int) -> dict:
        return pickle.loads(self._records.read(i))

    def key(self, i: int) -> str:
        d = self.sample_dict(i)
        return fmt.make_key(d["age"], d["identity"], d["source"])

    def sorted_sources(self) -> Utf8Column:
        """The sources in shard order (decoded on access; sort() first)."""
        return Utf8Column(self.sources()[self.order])

    def ordered(self, batch: int) -> Iterator[Sample]:
        """Every sample in shard order, `batch` read at a time (sort() first). Raises SpillError
        naming the staged file when a JPEG is no longer where it was."""
        if self.order is None:
            raise RuntimeError("SampleSpill.ordered() before sort()")
        files = np.frombuffer(self._file, np.int32)
        offsets = np.frombuffer(self._offset, np.int64)
        sizes = np.frombuffer(self._size, np.int64)
        for lo in range(0, len(self), batch):
            ids = self.order[lo : lo + batch]
            jpegs: dict[int, bytes] = {}
            # Read in file and offset order: each staged file opened once a batch, read forwards.
            reads = ids[np.lexsort((offsets[ids], files[ids]))]
            current, f = -1, None
            try:
                for i in reads.tolist():
                    if files[i] != current:
                        if f is not None:
                            f.close()
                        current = int(files[i])
                        try:
                            f = open(self._files[current], "rb")
                        except OSError as e:
                            raise SpillError(f"{self._files[current]}: cannot read it back ({e.strerror or e})") from e
                    data = os.pread(f.fileno(), int(sizes[i]), int(offsets[i]))
                    if len(data) != sizes[i]:
                        raise SpillError(f"{self._files[current]}: cut short (a JPEG of {sizes[i]} bytes at "
                                         f"{offsets[i]} is not all there)")
                    jpegs[i] = data
            finally:
                if f is not None:
                    f.close()
            for i in ids.tolist():
                d = self.sample_dict(i)
                yield Sample(d["age"], d["identity"], d["source"], jpegs.pop(i), d["meta"])

    def close(self) -> None:
        self._records.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
