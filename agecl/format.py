"""The on-disk contract of a shard set: names, key grammar, index dtype, version.

Both the writer (`agecl.shards`) and every reader (`agecl.reader`, the loaders, the tests) import
this module; nothing else spells a file name or a field of the index.

A shard set is one folder:

    manifest.json          written last: its presence means the set is complete
    index.npy              INDEX_DTYPE, one row per sample, in shard order (= global sample id)
    identities.json        list of identity strings; index["identity"] indexes it
    shard-00000.tar ...    WebDataset tars: <key>.jpg (256x256 RGB JPEG) + <key>.json per sample
    shard-00000.idx ...    DALI index of each tar (the format of DALI's wds2idx, v1.2)
    splits/<name>.npy      int16 fold of every sample (-1: in no fold; -2: in the training part of
                           every fold, never tested); test of fold k = (fold == k)
    splits/<name>.json     what the split is: protocol, folds, seed, level, source
    rejects.jsonl          one line per input photo that did not become a sample: source, reason

Samples are ordered by (age, identity, source) so that each shard covers a narrow age range and
holds many identities.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1

IMAGE_SIZE = 256  # side of the aligned face stored in a shard, pixels

MANIFEST_FILE = "manifest.json"
INDEX_FILE = "index.npy"
IDENTITIES_FILE = "identities.json"
# (N,) uint32 CRC-32 of every sample's JPEG bytes, in index order; checked when a set is opened.
# Optional: sets written before it have none.
CHECKSUMS_FILE = "checksums.npy"
REJECTS_FILE = "rejects.jsonl"
SPLITS_DIR = "splits"
# Split values that are not folds. NOT_IN_SPLIT: the sample is in no fold (neither trained on nor
# tested). EVERY_TRAIN_PART: trained on in every fold and never tested, e.g. another data set's
# faces replayed while fine-tuning on this one (agecl.combine).
NOT_IN_SPLIT = -1
EVERY_TRAIN_PART = -2
SHARD_PATTERN = "shard-{:05d}.tar"
DALI_INDEX_PATTERN = "shard-{:05d}.idx"

# Member extensions inside a tar: <key>.jpg and <key>.json (WebDataset: the key ends at the first dot).
IMAGE_EXT = "jpg"
META_EXT = "json"

# One row per sample. Little-endian, fixed widths: the file is memory-mapped read-only.
INDEX_DTYPE = np.dtype(
    [
        ("shard", "<u4"),  # shard number: SHARD_PATTERN.format(shard)
        ("offset", "<u8"),  # byte offset of the JPEG's data inside the tar
        ("size", "<u4"),  # byte length of the JPEG
        ("age", "<i2"),  # years
        ("identity", "<i4"),  # position in identities.json
    ]
)

# Table 1 of the paper: the age groups that histograms and per-group errors use. [lo, hi] inclusive.
AGE_BINS = ((0, 9), (10, 19), (20, 29), (30, 39), (40, 49), (50, 59), (60, 69), (70, 200))

# The aligned frame. ArcFace's five-point template (eye centres, nose tip, mouth corners, in
# MTCNN's order: image-left eye, image-right eye, nose, image-left mouth corner, image-right
# mouth corner) on its 112x112 crop, in units of that crop's side. That crop is tight: it cuts the
# forehead and the chin, which carry age (the paper's attention maps dwell on the forehead).
ARCFACE_TEMPLATE = (
    np.array(
        [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]],
        dtype=np.float64,
    )
    / 112.0
)
# coverage = side of our crop / side of ArcFace's crop, about the crop centre. 1.4 keeps the whole
# forehead and the chin in view: eyes at y = 0.47 and mouth at y = 0.73 of the side, 58 px between
# the eyes at 256.
DEFAULT_COVERAGE = 1.4


# What fills the aligned frame where it runs past the photo's edge (align.warp_face): "reflect"
# mirrors the photo (OpenCV's BORDER_REFLECT_101), "replicate" repeats its edge pixels, "constant"
# is black (insightface's norm_crop). A shard set records its choice in manifest["template"]
# ["border"] and a checkpoint in its "template"; sets and checkpoints made before the choice existed
# have no such field and were made with DEFAULT_BORDER.
BORDERS = ("reflect", "replicate", "constant")
DEFAULT_BORDER = "reflect"

# Edges of the manifest's histogram of each sample's "outside" (share of the aligned frame beyond
# the photo's edge): [0, 0.01), [0.01, 0.05), ..., [0.5, 1].
OUTSIDE_EDGES = (0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0)


def template_border(template: dict | None) -> str:
    """The border of a manifest's or checkpoint's "template" (DEFAULT_BORDER when it names none)."""
    return str((template or {}).get("border") or DEFAULT_BORDER)


def face_template(size: int = IMAGE_SIZE, coverage: float = DEFAULT_COVERAGE) -> np.ndarray:
    """(5, 2) float32 pixel coordinates (x, y) where the five landmarks land in a size x size face."""
    if coverage <= 0:
        raise ValueError(f"coverage must be positive, got {coverage}")
    unit = 0.5 + (ARCFACE_TEMPLATE - 0.5) / coverage
    return (unit * size).astype(np.float32)


_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class FormatError(ValueError):
    """A shard set is missing, incomplete, corrupt or of another format version."""


def make_key(age: int, identity: str, source: str) -> str:
    """The WebDataset key of a sample: readable, sortable by age, free of dots and slashes.

    `source` is the photo's path relative to the input root; its suffix is dropped.
    """
    stem = source.rsplit(".", 1)[0] if "." in Path(source).name else source
    return f"a{int(age):03d}_{_KEY_UNSAFE.sub('-', str(identity))}_{_KEY_UNSAFE.sub('-', stem)}"


def shard_path(root: Path | str, shard: int) -> Path:
    return Path(root) / SHARD_PATTERN.format(int(shard))


def dali_index_path(root: Path | str, shard: int) -> Path:
    return Path(root) / DALI_INDEX_PATTERN.format(int(shard))


def split_path(root: Path | str, name: str) -> Path:
    return Path(root) / SPLITS_DIR / f"{name}.npy"


def load_manifest(root: Path | str) -> dict:
    """Read and check a shard set's manifest. Raises FormatError naming the folder and the reason."""
    root = Path(root)
    path = root / MANIFEST_FILE
    if not root.is_dir():
        raise FormatError(f"{root}: no such shard folder")
    if not path.is_file():
        raise FormatError(
            f"{path}: missing; the shard set is incomplete (run tools/make_shards.py again to finish it)"
        )
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: not valid JSON ({e})") from e
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: format version {version!r}, this agecl reads version {FORMAT_VERSION}; rebuild the shards"
        )
    return manifest


def load_index(root: Path | str) -> np.ndarray:
    """The random-access index, memory-mapped read-only. Raises FormatError on a wrong dtype."""
    path = Path(root) / INDEX_FILE
    if not path.is_file():
        raise FormatError(f"{path}: missing index")
    index = np.load(path, mmap_mode="r")
    if index.dtype != INDEX_DTYPE:
        raise FormatError(f"{path}: dtype {index.dtype}, expected {INDEX_DTYPE}")
    return index


def load_identities(root: Path | str) -> list[str]:
    path = Path(root) / IDENTITIES_FILE
    if not path.is_file():
        raise FormatError(f"{path}: missing identities list")
    return json.loads(path.read_text())


def load_split(root: Path | str, name: str) -> np.ndarray:
    """Fold of every sample (int16, -1 = in no fold). Raises FormatError listing the known splits."""
    path = split_path(root, name)
    if not path.is_file():
        known = sorted(p.stem for p in (Path(root) / SPLITS_DIR).glob("*.npy"))
        raise FormatError(f"{path}: no split {name!r} in this shard set (known: {', '.join(known) or 'none'})")
    return np.load(path)


def age_bin_label(lo: int, hi: int) -> str:
    return f"{lo}+" if hi >= 200 else f"{lo}-{hi}"
