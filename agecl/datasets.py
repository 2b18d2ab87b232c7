"""Readers of raw face-age datasets: a folder or a CSV in, labelled photo records out.

Every reader returns an `Inputs`: the photos whose labels parse, as `Record`s sorted by source,
and the photos whose labels do not, as rejects with a reason "bad-label: <what>" and a message.
Nothing is dropped silently and nothing is decoded here: whether a photo opens, and whether it
has a face, is the builder's business (`agecl.build`).

    fgnet    a folder of NNNAxx[.letter].JPG (person NNN at age xx; any case)
    morph    the MORPH II album CSV (id_num, age, photo columns) and the photo folder
    utkface  a folder of age_gender_race_date.jpg[.chip.jpg]; no identities (each photo is its own)
    aaf      All-Age-Faces: a folder of NNNNNAxx.jpg (serial NNNNN at age xx); each photo its own
             identity; gender and the authors' train/val split from splits/*.txt beside the folder
    csv      any dataset as a CSV with path, age and identity columns

What counts as a photo in a folder: a file whose extension is one of PHOTO_EXTENSIONS (jpg, jpeg,
png, bmp, tif, tiff, webp, in any case). Other files (.txt, .pts, .csv ...) are clearly not
photos and are ignored (counted in `Inputs.ignored`); a photo-extension file that does not decode
becomes a reject later, in the builder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from . import format as fmt

PHOTO_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp"})
DATASETS = ("fgnet", "morph", "utkface", "aaf", "csv")
MAX_AGE = 150  # years; a larger label is a typo, not a person

# Column names of each CSV reader: (path, age, identity). MORPH II's album CSV
# (morph_2008_nonCommercial.csv) has id_num, picture_num, dob, doa, race, gender, facial_hair,
# age, age_diff, glasses, photo; photo is a path such as Album2/003307_00M21.JPG.
DEFAULT_COLUMNS = {"morph": ("photo", "age", "id_num"), "csv": ("path", "age", "identity")}

UTKFACE_IDENTITY_NOTE = (
    "UTKFace has no identities: each photo is its own identity; subject-exclusive splits are image-level"
)
AAF_IDENTITY_NOTE = (
    "All-Age-Faces shows every person once: each photo is its own identity (its serial number); "
    "subject-exclusive splits are image-level"
)

# Reject reasons of this module. The part after "bad-label: " is a fixed word, so that the
# manifest's count of rejects by reason groups them; the message says what exactly was wrong.
BAD_NAME = "bad-label: name"
BAD_AGE = "bad-label: age"
BAD_IDENTITY = "bad-label: identity"
BAD_PATH = "bad-label: path"
DUPLICATE = "bad-label: duplicate"


class DatasetError(ValueError):
    """The dataset as a whole cannot be read: a missing or empty folder, a CSV without rows or
    without a needed column. Raised before any work, naming the path."""


@dataclass(frozen=True)
class Record:
    """One labelled photo."""

    path: str  # the file to read (absolute, or as given in the CSV joined to the root)
    source: str  # path relative to the input root, '/'-separated: unique within a dataset
    age: int  # years
    identity: str
    # Labels beyond age and identity that the dataset gives (AAF's gender), kept in the sample's
    # JSON. Not compared or hashed: a Record is identified by its source.
    meta: dict | None = field(default=None, compare=False, hash=False)


@dataclass
class PublishedSplit:
    """A split the dataset's authors distribute: (file name, fold) pairs for `splits.import_split`."""

    name: str  # the split's name under splits/ (not a built-in protocol's)
    origin: str  # the list file(s) it was read from, for messages and splits/<name>.json
    entries: list[tuple[str, int]]
    folds: dict[int, str]  # what each fold is, e.g. {0: "val.txt (the authors' test half)"}


@dataclass
class Inputs:
    """What a reader found: photos with labels, and photos whose labels did not parse."""

    dataset: str
    root: str  # the input root (photo folder)
    records: list[Record]  # sorted by source
    rejects: list[dict]  # {source, reason, message}: bad labels and duplicates
    ignored: int = 0  # files skipped as clearly not photos (by extension)
    identity_note: str | None = None
    extra: dict = field(default_factory=dict)  # reader details for the manifest (csv, columns)
    published_splits: list[PublishedSplit] = field(default_factory=list)  # imported beside the built-in ones

    @property
    def count(self) -> int:
        """Photos found: every one ends as a sample or a reject."""
        return len(self.records) + len(self.rejects)

    def digest(self) -> str:
        """sha256 of the labelled sources: two runs with the same digest read the same inputs."""
        h = hashlib.sha256()
        for r in self.records:
            # meta only when present, so that readers without it keep the digests they had.
            h.update(json.dumps([r.source, r.age, r.identity] + ([r.meta] if r.meta else []), sort_keys=True).encode())
        for split in self.published_splits:
            h.update(json.dumps([split.name, split.entries]).encode())
        for r in sorted(self.rejects, key=lambda r: (r["source"], r["reason"])):
            h.update(json.dumps([r["source"], r["reason"]]).encode())
        return h.hexdigest()


def is_photo(name: str) -> bool:
    """Whether a file name has a photo extension (see PHOTO_EXTENSIONS)."""
    return Path(name).suffix.lower() in PHOTO_EXTENSIONS


def list_photos(root: Path | str) -> tuple[list[str], int]:
    """Sources ('/'-separated, relative to root, sorted) of the photo files under `root`, and the
    count of other files ignored. Raises DatasetError when the folder is missing or has no photo."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder")
    photos, ignored = [], 0
    for p in root.rglob("*"):
        if p.is_dir():
            continue
        if is_photo(p.name):
            photos.append(p.relative_to(root).as_posix())
        else:
            ignored += 1
    if not photos:
        exts = ", ".join(sorted(e.lstrip(".") for e in PHOTO_EXTENSIONS))
        raise DatasetError(
            f"{root}: no photos found (looked for {exts}, any case; {ignored} other file(s) ignored)"
        )
    return sorted(photos), ignored


def _reject(source: str, reason: str, message: str) -> dict:
    return {"source": source, "reason": reason, "message": f"{source}: {message}"}


def _parse_age(text: str) -> int | None:
    """An age label as int years, or None. Accepts '25', ' 25 ', '25.0' (a spreadsheet's float)."""
    text = str(text).strip()
    try:
        value = float(text)
    except ValueError:
        return None
    if not value.is_integer() or not 0 <= value <= MAX_AGE:
        return None
    return int(value)


def _dedupe(records: list[Record], rejects: list[dict]) -> list[Record]:
    """Keep the first record of each source and of each shard key; the others become duplicate
    rejects naming the photo they clash with. Keys can collide for distinct sources because
    `format.make_key` drops the extension and maps unsafe characters to '-' ('001A02.JPG' and
    '001A02.png'; 'a b.jpg' and 'a-b.jpg'), and two samples must never share a key."""
    kept, by_source, by_key = [], {}, {}
    for r in records:
        key = fmt.make_key(r.age, r.identity, r.source)
        other = by_source.get(r.source) or by_key.get(key)
        if other is not None:
            rejects.append(_reject(r.source, DUPLICATE, f"same photo or same sample key as {other} (listed twice?)"))
            continue
        by_source[r.source] = r.source
        by_key[key] = r.source
        kept.append(r)
    return kept


def _finish(dataset: str, root: Path, records: list[Record], rejects: list[dict], **kw) -> Inputs:
    records.sort(key=lambda r: r.source)
    records = _dedupe(records, rejects)
    rejects.sort(key=lambda r: (r["source"], r["reason"]))
    return Inputs(dataset, str(root), records, rejects, **kw)


# --- folders whose file names are the labels ---------------------------------------------------

# FG-NET: person (3 digits in the release; any count accepted), 'A', age, optional letter for a
# second photo at the same age. Case-insensitive: some copies write 001a02.jpg.
_FGNET = re.compile(r"^(?P<person>\d+)a(?P<age>\d+)(?P<extra>[a-z]?)$", re.IGNORECASE)


def _read_named(dataset: str, root: Path | str, pattern: re.Pattern, naming: str, identity, **kw) -> Inputs:
    """The photos of a folder whose file names carry the labels: `pattern` must match the name up to
    its first dot and capture `age`; `identity(source, stem, match)` names the person."""
    root = Path(root)
    sources, ignored = list_photos(root)
    records, rejects = [], []
    for source in sources:
        stem = PurePosixPath(source).name.split(".")[0]
        m = pattern.match(stem)
        age = _parse_age(m["age"]) if m else None
        if m is None:
            rejects.append(_reject(source, BAD_NAME, f"file name is not {naming}"))
        elif age is None:
            rejects.append(_reject(source, BAD_AGE, f"age {m['age']!r} is out of range 0-{MAX_AGE}"))
        else:
            records.append(Record(str(root / source), source, age, identity(source, stem, m)))
    return _finish(dataset, root, records, rejects, ignored=ignored, **kw)


def read_fgnet(root: Path | str) -> Inputs:
    """FG-NET: files NNNAxx.JPG (person NNN, age xx) or NNNAxxa.JPG (a second photo at that age),
    any case. The identity is the person number as written ('001')."""
    return _read_named(
        "fgnet", root, _FGNET, "FG-NET's NNNAxx[letter] (person NNN, age xx)", lambda source, stem, m: m["person"]
    )


# UTKFace: [age]_[gender]_[race]_[date&time].jpg(.chip.jpg). A few files of the release lack the
# race field (e.g. 39_1_20170116174525125.jpg.chip.jpg); their age still parses, so they are kept.
_UTK = re.compile(r"^(?P<age>\d{1,3})_(?P<gender>[01])_(?:(?P<race>[0-4])_)?(?P<date>\d{8,})$")


def read_utkface(root: Path | str) -> Inputs:
    """UTKFace: files age_gender_race_date.jpg[.chip.jpg]. No identity is known: each photo is its
    own identity (its source up to the first dot of the file name, e.g.
    'part1/25_0_1_20170116174525125'), so subject-exclusive splits are image-level."""

    def own_identity(source: str, stem: str, m) -> str:
        return str(PurePosixPath(source).parent / stem).removeprefix("./")

    return _read_named(
        "utkface", root, _UTK, "UTKFace's age_gender_race_date.jpg", own_identity, identity_note=UTKFACE_IDENTITY_NOTE
    )


# All-Age-Faces: NNNNNAxx.jpg, a five-digit serial number and the age (00123A35.jpg: serial 00123 at
# 35). Every photo is a different person. The release's splits/train.txt and splits/val.txt list
# '<file name> <gender>' (0 female, 1 male) and together are the authors' random half split.
_AAF = re.compile(r"^(?P<serial>\d+)a(?P<age>\d+)$", re.IGNORECASE)
AAF_SPLIT = "authors"  # the name of the authors' train/val split in the shard set
AAF_SPLIT_FILES = ("val.txt", "train.txt")  # fold 0 (the default test fold) is val: train.txt trains it
AAF_GENDER = {"0": "female", "1": "male"}


def _aaf_lists(root: Path) -> Path | None:
    """The folder holding AAF's train.txt and val.txt: splits/ beside the photo folder (the release's
    layout, root = <aaf>/images) or inside it (root = <aaf>); None when there is none."""
    for folder in (root.parent / "splits", root / "splits"):
        if all((folder / f).is_file() for f in AAF_SPLIT_FILES):
            return folder
    return None


def _read_aaf_list(path: Path) -> list[tuple[str, str]]:
    """Lines '<file name> <gender>' of one AAF split list; DatasetError names the line that does not parse."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise DatasetError(f"{path}: cannot read the split list ({e.strerror or e})") from e
    out = []
    for number, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or parts[1] not in AAF_GENDER:
            raise DatasetError(f"{path} line {number}: expected '<file name> <gender 0|1>', got {line.strip()!r}")
        out.append((parts[0], parts[1]))
    if not out:
        raise DatasetError(f"{path}: no '<file name> <gender>' lines")
    return out


def read_aaf(root: Path | str) -> Inputs:
    """All-Age-Faces: files NNNNNAxx.jpg (serial NNNNN at age xx). Each photo is its own identity (the
    serial number as written, '00123'). When the release's splits/train.txt and val.txt are found
    (beside the photo folder, or inside it) each sample keeps its gender ("female" / "male") and the
    authors' split becomes the published split "authors": fold 0 = val.txt, fold 1 = train.txt, so
    fold 0 trains on the authors' training half and tests on their other half. Without the lists the
    photos are read all the same (no gender, no "authors" split; the manifest says so)."""
    root = Path(root)
    lists = _aaf_lists(root)
    gender: dict[str, str] = {}  # lower-cased file name -> "female" / "male"
    entries: list[tuple[str, int]] = []
    if lists is not None:
        for fold, name in enumerate(AAF_SPLIT_FILES):
            for file_name, code in _read_aaf_list(lists / name):
                key = file_name.lower()
                if gender.get(key, AAF_GENDER[code]) != AAF_GENDER[code]:
                    raise DatasetError(f"{lists / name}: {file_name} has gender {code}, another list gives it {gender[key]}")
                gender[key] = AAF_GENDER[code]
                entries.append((file_name, fold))

    def own_identity(source: str, stem: str, m) -> str:
        return m["serial"]

    inputs = _read_named("aaf", root, _AAF, "AAF's NNNNNAxx (serial NNNNN, age xx)", own_identity,
                         identity_note=AAF_IDENTITY_NOTE)
    for i, r in enumerate(inputs.records):
        g = gender.get(PurePosixPath(r.source).name.lower())
        if g is not None:
            inputs.records[i] = Record(r.path, r.source, r.age, r.identity, {"gender": g})
    if lists is None:
        inputs.extra["split_lists"] = (
            f"none found (looked for {' and '.join(AAF_SPLIT_FILES)} in {root.parent / 'splits'} and "
            f"{root / 'splits'}): no gender, no {AAF_SPLIT!r} split"
        )
    else:
        inputs.extra["split_lists"] = [str(lists / f) for f in AAF_SPLIT_FILES]
        inputs.published_splits.append(PublishedSplit(
            AAF_SPLIT, " + ".join(str(lists / f) for f in AAF_SPLIT_FILES), entries,
            {0: "val.txt (test half of the authors' split)", 1: "train.txt (training half of the authors' split)"},
        ))
    return inputs


# --- CSV label files ----------------------------------------------------------------------------


def read_csv(
    csv_path: Path | str,
    root: Path | str | None = None,
    path_column: str | None = None,
    age_column: str | None = None,
    identity_column: str | None = None,
    dataset: str = "csv",
) -> Inputs:
    """A CSV with one row per photo: path (relative to `root`, default the CSV's folder), age in
    years, identity. Column names default to DEFAULT_COLUMNS[dataset]. Rows whose age, identity
    or path does not parse are rejects; a missing column or a CSV without rows is a DatasetError."""
    csv_path = Path(csv_path)
    root = Path(root) if root else csv_path.parent
    defaults = DEFAULT_COLUMNS.get(dataset, DEFAULT_COLUMNS["csv"])
    columns = (path_column or defaults[0], age_column or defaults[1], identity_column or defaults[2])
    if not csv_path.is_file():
        raise DatasetError(f"{csv_path}: no such CSV file")
    if not root.is_dir():
        raise DatasetError(f"{root}: no such photo folder")
    # utf-8-sig: spreadsheets save a byte-order mark that would otherwise stick to the first name.
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in columns if c not in header]
        if missing:
            raise DatasetError(
                f"{csv_path}: no column {', '.join(map(repr, missing))} (columns: {', '.join(header) or 'none'}); "
                "name them with --path-column, --age-column, --identity-column"
            )
        reader.fieldnames = header
        rows = list(reader)
    if not rows:
        raise DatasetError(f"{csv_path}: no rows (only a header, or an empty file)")
    pc, ac, ic = columns
    records, rejects = [], []
    for line, row in enumerate(rows, start=2):  # line 1 is the header
        raw_path = (row.get(pc) or "").strip()
        where = f"{csv_path.name} line {line}"
        if not raw_path:
            rejects.append(_reject(f"{csv_path.name}:{line}", BAD_PATH, f"{where}: empty {pc!r}"))
            continue
        path = Path(raw_path) if Path(raw_path).is_absolute() else root / raw_path
        source = _source(raw_path, root)
        age = _parse_age(row.get(ac) or "")
        identity = (row.get(ic) or "").strip()
        if age is None:
            rejects.append(_reject(source, BAD_AGE, f"{where}: {ac} {row.get(ac)!r} is not a whole number of years 0-{MAX_AGE}"))
        elif not identity:
            rejects.append(_reject(source, BAD_IDENTITY, f"{where}: empty {ic!r}"))
        else:
            records.append(Record(str(path), source, age, identity))
    return _finish(
        dataset, root, records, rejects, extra={"csv": str(csv_path), "columns": {"path": pc, "age": ac, "identity": ic}}
    )


def _source(raw_path: str, root: Path) -> str:
    """A CSV path as a source: relative to the root, '/'-separated, without './'."""
    p = Path(raw_path.replace("\\", "/"))
    if p.is_absolute():
        try:
            p = p.relative_to(root.resolve())
        except ValueError:
            return p.as_posix().lstrip("/")
    return PurePosixPath(p.as_posix()).as_posix().removeprefix("./")


def read_morph(
    csv_path: Path | str,
    root: Path | str | None = None,
    path_column: str | None = None,
    age_column: str | None = None,
    identity_column: str | None = None,
) -> Inputs:
    """MORPH II: the album CSV (columns id_num, age, photo by default) and the photo folder
    (default: the CSV's folder; `photo` paths are relative to it)."""
    return read_csv(csv_path, root, path_column, age_column, identity_column, dataset="morph")


def read_dataset(
    dataset: str,
    root: Path | str | None = None,
    csv_path: Path | str | None = None,
    path_column: str | None = None,
    age_column: str | None = None,
    identity_column: str | None = None,
) -> Inputs:
    """Dispatch to the reader of `dataset` (one of DATASETS)."""
    if dataset in ("fgnet", "utkface", "aaf"):
        if root is None:
            raise DatasetError(f"--dataset {dataset} needs --root (the photo folder)")
        return {"fgnet": read_fgnet, "utkface": read_utkface, "aaf": read_aaf}[dataset](root)
    if dataset in ("morph", "csv"):
        if csv_path is None:
            raise DatasetError(f"--dataset {dataset} needs --csv (the label file)")
        return read_csv(csv_path, root, path_column, age_column, identity_column, dataset=dataset)
    raise DatasetError(f"unknown dataset {dataset!r} (known: {', '.join(DATASETS)})")
