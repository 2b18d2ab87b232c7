"""Read-only access to a shard set: index + memory-mapped shard tars -> JPEG bytes by sample id.

`ShardSet(root)` checks everything it can cheaply at open time, so that a bad set fails before the
first epoch with a message naming the file and the sample:

- the manifest (format version) and the index dtype (`agecl.format`);
- the index against the manifest (sample count, shard numbers, identity numbers);
- every shard file exists, ends in the end-of-archive blocks of a whole tar, and every sample's JPEG
  lies inside its shard (a truncated tar);
- every JPEG starts with the SOI marker FF D8 and ends with the EOI marker FF D9 (vectorised over
  the memory maps: four bytes a sample);
- every JPEG's CRC-32 equals the one recorded at build time (`checksums.npy`, when present): a
  byte flipped after the build is named before training starts.

Nothing parses a tar at read time: the index gives (shard, offset, size) and `jpeg(i)` is a
zero-copy uint8 view into the shard's read-only memory map, opened once per process, lazily.
A `ShardSet` pickles without its maps (DataLoader workers reopen them on first use).
"""

from __future__ import annotations

import json
import mmap
import zlib
from pathlib import Path

import numpy as np

from . import format as fmt
from .config import NO_TEST_FOLD

SOI = (0xFF, 0xD8)  # JPEG start-of-image marker
EOI = (0xFF, 0xD9)  # JPEG end-of-image marker
PARTS = ("train", "test")


class ShardSet:
    """A shard set opened read-only: index, labels, splits and the JPEG bytes of every sample.

    root: the folder written by `agecl.shards` / tools/make_shards.py.
    verify: check the JPEG markers of every sample at open (reads four bytes a sample).
    Raises `format.FormatError` naming the file (and the sample) when the set is bad.
    """

    def __init__(self, root: Path | str, verify: bool = True):
        self.root = Path(root)
        self.manifest = fmt.load_manifest(self.root)
        self.identity_names = fmt.load_identities(self.root)
        self._open_index()
        self._check_index()
        self._maps: dict[int, np.ndarray] = {}  # shard -> (bytes,) uint8 view of its read-only mmap
        self._index_members: dict[int, list[dict]] = {}  # shard -> its samples' members, read from its DALI index on demand
        self._check_shards()
        if verify:
            self.verify()

    # ------------------------------------------------------------------------------------------
    # Opening and checks

    def _open_index(self) -> None:
        self.index = fmt.load_index(self.root)  # (N,) INDEX_DTYPE, memory-mapped read-only
        # Plain columns, loaded once: (N,) arrays the loaders gather labels from every batch.
        self.ages = np.ascontiguousarray(self.index["age"], dtype=np.int64)  # (N,) years
        self.identities = np.ascontiguousarray(self.index["identity"], dtype=np.int64)  # (N,)
        self._shard = np.ascontiguousarray(self.index["shard"], dtype=np.int64)  # (N,)
        self._offset = np.ascontiguousarray(self.index["offset"], dtype=np.int64)  # (N,) bytes
        self._size = np.ascontiguousarray(self.index["size"], dtype=np.int64)  # (N,) bytes

    def _check_index(self) -> None:
        path = self.root / fmt.INDEX_FILE
        n = len(self.index)
        if self.manifest.get("samples") != n:
            raise fmt.FormatError(f"{path}: {n} samples, the manifest says {self.manifest.get('samples')}")
        self.num_shards = int(self.manifest.get("shards", 0))
        if n and (self._shard.min() < 0 or self._shard.max() >= self.num_shards):
            i = int(np.flatnonzero((self._shard < 0) | (self._shard >= self.num_shards))[0])
            raise fmt.FormatError(f"{path}: sample {i} is in shard {self._shard[i]}, the manifest lists {self.num_shards}")
        if n and np.any(np.diff(self._shard) < 0):
            raise fmt.FormatError(f"{path}: samples are not in shard order")
        if n and (self.identities.min() < 0 or self.identities.max() >= len(self.identity_names)):
            i = int(np.flatnonzero((self.identities < 0) | (self.identities >= len(self.identity_names)))[0])
            raise fmt.FormatError(
                f"{path}: sample {i} has identity {self.identities[i]}, "
                f"{fmt.IDENTITIES_FILE} lists {len(self.identity_names)}"
            )
        if n and np.any(self._size < 4):
            i = int(np.flatnonzero(self._size < 4)[0])
            raise fmt.FormatError(f"{self.sample_name(i)}: JPEG of {self._size[i]} bytes")

    def _check_shards(self) -> None:
        """Every shard exists, and every sample's bytes lie inside its shard (vectorised)."""
        sizes = np.zeros(self.num_shards, np.int64)  # (shards,) file lengths in bytes
        for s in range(self.num_shards):
            path = fmt.shard_path(self.root, s)
            if not path.is_file():
                raise fmt.FormatError(f"{path}: missing shard ({self.count_in_shard(s)} samples of {self.root} are in it)")
            sizes[s] = path.stat().st_size
        self._shard_bytes = sizes
        end = self._offset + self._size  # (N,) one past each JPEG's last byte
        beyond = end > sizes[self._shard]
        if beyond.any():
            i = int(np.flatnonzero(beyond)[0])
            s = int(self._shard[i])
            raise fmt.FormatError(
                f"{fmt.shard_path(self.root, s)}: truncated tar ({sizes[s]} bytes): {self.sample_name(i, path=False)} "
                f"needs bytes [{self._offset[i]}, {end[i]}); {int(beyond.sum())} sample(s) affected"
            )
        for s in range(self.num_shards):
            # A whole tar ends in two zero blocks: a cut that spares every JPEG still loses the
            # last sample's other members (its .json), which WebDataset readers need.
            path = fmt.shard_path(self.root, s)
            with open(path, "rb") as f:
                f.seek(max(0, sizes[s] - 1024))
                tail = f.read()
            if sizes[s] % 512 or len(tail) < 1024 or tail.count(0) != len(tail):
                last = int(np.searchsorted(self._shard, s, side="right")) - 1
                where = f"its last sample, {self.sample_name(last, path=False)}," if last >= 0 and self._shard[last] == s else "it"
                raise fmt.FormatError(f"{path}: truncated tar ({sizes[s]} bytes, no end-of-archive blocks): {where} is cut")

    def verify(self) -> None:
        """Check that every JPEG starts with FF D8 and ends with FF D9 (four bytes a sample)."""
        for s in range(self.num_shards):
            lo, hi = np.searchsorted(self._shard, [s, s + 1])
            if lo == hi:
                continue
            data = self._map(s)
            off, size = self._offset[lo:hi], self._size[lo:hi]
            ok = (
                (data[off] == SOI[0])
                & (data[off + 1] == SOI[1])
                & (data[off + size - 2] == EOI[0])
                & (data[off + size - 1] == EOI[1])
            )  # (samples in shard,) bool
            if not ok.all():
                bad = lo + np.flatnonzero(~ok)
                i = int(bad[0])
                head = bytes(data[self._offset[i] : self._offset[i] + 2]).hex(" ")
                tail = bytes(data[self._offset[i] + self._size[i] - 2 : self._offset[i] + self._size[i]]).hex(" ")
                raise fmt.FormatError(
                    f"{self.sample_name(i)}: not a complete JPEG (starts {head}, ends {tail}; expected "
                    f"ff d8 ... ff d9); {len(bad)} bad sample(s) in this shard"
                )
        self._verify_checksums()

    def _verify_checksums(self) -> None:
        """Every JPEG's CRC-32 against checksums.npy, when the set has one (bytes changed after the
        build: a bad disk, a bad copy). Reads every byte once (about 1 GB/s)."""
        path = self.root / fmt.CHECKSUMS_FILE
        if not path.is_file():
            return
        try:
            expected = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise fmt.FormatError(f"{path}: unreadable checksums ({e})") from e
        if expected.shape != (len(self),):
            raise fmt.FormatError(f"{path}: {expected.shape} checksums, the index has {len(self)} samples")
        for s in range(self.num_shards):
            lo, hi = np.searchsorted(self._shard, [s, s + 1])
            data = self._map(s) if hi > lo else None
            for i in range(lo, hi):
                o = int(self._offset[i])
                if zlib.crc32(data[o : o + int(self._size[i])]) != int(expected[i]):
                    raise fmt.FormatError(
                        f"{self.sample_name(i)}: the JPEG's bytes changed after the build (CRC-32 differs from "
                        f"{fmt.CHECKSUMS_FILE}); restore the shard from a good copy or rebuild the set"
                    )

    # ------------------------------------------------------------------------------------------
    # Memory maps (one per shard and process, opened on first use)

    def _map(self, shard: int) -> np.ndarray:
        data = self._maps.get(shard)
        if data is None:
            path = fmt.shard_path(self.root, shard)
            try:
                with open(path, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # the map outlives the fd
            except (FileNotFoundError, ValueError) as e:  # ValueError: an empty file cannot be mapped
                raise fmt.FormatError(f"{path}: cannot map shard ({e})") from e
            data = np.frombuffer(mm, dtype=np.uint8)  # (bytes,) read-only, zero copy
            self._maps[shard] = data
        return data

    def __getstate__(self):
        # Maps and index columns are per process: workers reopen them (mmap cannot be pickled, and
        # copying the index would cost every worker its own copy).
        state = self.__dict__.copy()
        for name in ("_maps", "_index_members", "index", "ages", "identities", "_shard", "_offset", "_size"):
            state.pop(name, None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._maps, self._index_members = {}, {}
        self._open_index()

    # ------------------------------------------------------------------------------------------
    # Samples

    def __len__(self) -> int:
        return len(self.index)

    def jpeg(self, i: int) -> np.ndarray:
        """The encoded JPEG of sample i: a (size,) uint8 read-only view into the shard's map."""
        o = int(self._offset[i])
        return self._map(int(self._shard[i]))[o : o + int(self._size[i])]

    def jpegs(self, ids: np.ndarray) -> list[np.ndarray]:
        """The encoded JPEGs of samples `ids` (any int array), as a list of zero-copy views."""
        ids = np.asarray(ids)
        shards, offs, sizes = self._shard[ids].tolist(), self._offset[ids].tolist(), self._size[ids].tolist()
        maps = self._maps
        return [(maps.get(s) if s in maps else self._map(s))[o : o + n] for s, o, n in zip(shards, offs, sizes)]

    def split(self, name: str) -> np.ndarray:
        """(N,) int16 fold of every sample under protocol `name` (-1: in no fold, -2: in every
        fold's training part)."""
        folds = fmt.load_split(self.root, name)
        if len(folds) != len(self):
            raise fmt.FormatError(f"{fmt.split_path(self.root, name)}: {len(folds)} rows, the index has {len(self)}")
        return folds

    def split_ids(self, protocol: str, fold: int, part: str = "train") -> np.ndarray:
        """Sample ids (int64, ascending) of one part of a protocol fold.

        part "test": the samples of fold `fold`; "train": the samples of every other fold and
        those marked EVERY_TRAIN_PART (-2) (samples in no fold, -1, are in neither). Fold
        NO_TEST_FOLD (-1) has no test part and trains on every fold.
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        folds = self.split(protocol)
        n_folds = int(folds.max()) + 1 if len(folds) else 0
        always = folds == fmt.EVERY_TRAIN_PART
        if fold == NO_TEST_FOLD:
            return np.flatnonzero((folds >= 0) | always).astype(np.int64) if part == "train" else np.zeros(0, np.int64)
        if not 0 <= fold < n_folds:
            raise ValueError(f"split {protocol!r} of {self.root} has folds 0..{n_folds - 1}, got fold {fold}")
        mask = folds == fold if part == "test" else ((folds >= 0) & (folds != fold)) | always
        return np.flatnonzero(mask).astype(np.int64)

    @property
    def min_age(self) -> int:
        m = self.manifest.get("min_age")
        return int(m) if m is not None else int(self.ages.min())

    @property
    def max_age(self) -> int:
        m = self.manifest.get("max_age")
        return int(m) if m is not None else int(self.ages.max())

    # ------------------------------------------------------------------------------------------
    # Names for error messages

    def count_in_shard(self, shard: int) -> int:
        lo, hi = np.searchsorted(self._shard, [shard, shard + 1])
        return int(hi - lo)

    def _members(self, s: int) -> list[dict[str, tuple[int, int, str]]]:
        """Shard s's samples in order, each {extension: (offset, size, member name)}, from its DALI
        index (read once; empty when unreadable)."""
        members = self._index_members.get(s)
        if members is None:
            members = []
            try:
                for line in fmt.dali_index_path(self.root, s).read_text().splitlines()[1:]:
                    fields = line.split()  # ext offset size name, per member
                    members.append({fields[k]: (int(fields[k + 1]), int(fields[k + 2]), fields[k + 3])
                                    for k in range(0, len(fields) - 3, 4)})
            except (OSError, ValueError):
                members = []
            self._index_members[s] = members
        return members

    def key(self, i: int) -> str:
        """The WebDataset key of sample i, from its shard's DALI index ("?" when unreadable)."""
        s = int(self._shard[i])
        members = self._members(s)
        j = i - int(np.searchsorted(self._shard, s))
        image = members[j].get(fmt.IMAGE_EXT) if 0 <= j < len(members) else None
        return image[2].rsplit(".", 1)[0] if image else "?"

    def meta(self, i: int) -> dict:
        """The JSON record stored beside sample i's JPEG (key, age, identity, source and what the
        builder added: detection score, landmarks, the share of the frame outside the photo ...)."""
        s = int(self._shard[i])
        members = self._members(s)
        j = i - int(np.searchsorted(self._shard, s))
        found = members[j].get(fmt.META_EXT) if 0 <= j < len(members) else None
        if found is None:
            raise fmt.FormatError(f"{self.sample_name(i)}: no .{fmt.META_EXT} member in {fmt.dali_index_path(self.root, s)}")
        offset, size, _ = found
        return json.loads(self._map(s)[offset : offset + size].tobytes())

    def sample_name(self, i: int, path: bool = True) -> str:
        """'<shard path>: sample <i> (key <key>)', the provenance every error carries."""
        where = f"sample {i} (key {self.key(i)})"
        return f"{fmt.shard_path(self.root, int(self._shard[i]))}: {where}" if path else where

    def __repr__(self) -> str:
        return f"ShardSet({str(self.root)!r}, samples={len(self)}, shards={self.num_shards})"

