"""Protocol splits: the fold of every sample, computed from arrays in the shard set's sample order.

Every function is pure and seeded: the same arrays and seed give the same folds. A fold array is
int, one entry per sample; -1 means "in no fold" (a sample a published list leaves out). The test
set of fold k is `folds == k`; training uses the other folds.

    lopo   FG-NET leave-one-person-out: fold = the person's rank (82 folds on FG-NET).
    rs     random split: image level, a seeded permutation dealt into k folds (sizes differ by <= 1).
    se     subject-exclusive, age-balanced (MORPH II): persons sorted by mean age are dealt into the
           folds in blocks of k, a seeded shuffle inside each block, so every fold gets one person
           of each k consecutive in age and the folds' age distributions match.
    kfold  subject-exclusive for any dataset: persons in a seeded random order, largest first, each
           to the fold with the fewest images so far (folds balanced in images, persons disjoint).
    <name> a published list (`read_split_list` + `import_split`): lines "file_name fold", matched
           by the file name of each sample's source.

Which are written for which dataset: SPLITS_FOR; the protocol training uses by default:
DEFAULT_PROTOCOL.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path, PurePosixPath
from typing import Sequence

import numpy as np

SPLITS_FOR = {"fgnet": ("lopo", "kfold"), "morph": ("rs", "se", "kfold")}
SPLITS_OTHER = ("kfold", "rs")  # utkface, csv, synthetic
DEFAULT_PROTOCOL = {"fgnet": "lopo", "morph": "se"}  # others: "kfold"
BUILTIN = ("lopo", "rs", "se", "kfold")

# Each protocol draws from its own stream of the seed, so that rs and kfold of one seed are
# unrelated shuffles.
_STREAM = {"rs": 1, "se": 2, "kfold": 3}


class SplitError(ValueError):
    """A split cannot be made: too few persons for k folds, a split list that does not parse or
    matches no sample."""


def splits_for(dataset: str) -> tuple[str, ...]:
    return SPLITS_FOR.get(dataset, SPLITS_OTHER)


def default_protocol(dataset: str) -> str:
    return DEFAULT_PROTOCOL.get(dataset, "kfold")


def _persons(identities: np.ndarray) -> tuple[np.ndarray, int]:
    """Person number (0..P-1, in sorted order of the identity values) of every sample, and P."""
    _, inverse = np.unique(np.asarray(identities), return_inverse=True)
    inverse = inverse.reshape(-1)
    return inverse, int(inverse.max()) + 1 if inverse.size else 0


def _check_k(k: int, units: int, what: str) -> None:
    if k < 2:
        raise SplitError(f"need at least 2 folds, got {k}")
    if units < k:
        raise SplitError(f"{k} folds need at least {k} {what}, the dataset has {units}")


def lopo(identities: np.ndarray) -> np.ndarray:
    """Leave-one-person-out: the fold of a sample is its person's rank among the sorted identities."""
    person, _ = _persons(identities)
    return person.astype(np.int64)


def random_split(n: int, k: int = 5, seed: int = 0) -> np.ndarray:
    """Image-level k-fold: a seeded permutation of the n samples dealt round-robin into k folds."""
    _check_k(k, n, "samples")
    order = np.random.default_rng([_STREAM["rs"], seed]).permutation(n)
    folds = np.empty(n, np.int64)
    folds[order] = np.arange(n) % k
    return folds


def subject_exclusive(ages: np.ndarray, identities: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Person-level k-fold balanced in age (the MORPH II SE protocol).

    Rule: persons are sorted by their mean age (ties in a seeded random order) and cut into blocks
    of k consecutive persons; inside each block a seeded permutation gives each person a different
    fold (the last, partial block takes a random subset of the folds). Each fold thus holds one
    person of every k neighbours in age: the folds' person counts differ by at most one and their
    age distributions match.
    """
    ages = np.asarray(ages, np.float64)
    person, persons = _persons(identities)
    _check_k(k, persons, "persons")
    rng = np.random.default_rng([_STREAM["se"], seed])
    mean_age = np.bincount(person, weights=ages, minlength=persons) / np.bincount(person, minlength=persons)
    rank_to_person = np.lexsort((rng.random(persons), mean_age))  # sort by mean age, random ties
    blocks = -(-persons // k)
    perms = np.argsort(rng.random((blocks, k)), axis=1)  # (blocks, k): one permutation of the folds each
    person_fold = np.empty(persons, np.int64)
    person_fold[rank_to_person] = perms.reshape(-1)[:persons]
    return person_fold[person]


def kfold(identities: np.ndarray, k: int = 5, seed: int = 0) -> np.ndarray:
    """Person-level k-fold for any dataset, balanced in images.

    Rule: persons in a seeded random order, then stably sorted by image count, largest first; each
    goes to the fold with the fewest images so far (lowest fold on ties). With one image a person
    (UTKFace) it is a seeded image-level round-robin.
    """
    person, persons = _persons(identities)
    _check_k(k, persons, "persons")
    counts = np.bincount(person, minlength=persons)
    shuffled = np.random.default_rng([_STREAM["kfold"], seed]).permutation(persons)
    order = shuffled[np.argsort(-counts[shuffled], kind="stable")]
    load = np.zeros(k, np.int64)
    person_fold = np.empty(persons, np.int64)
    for p in order:  # one step per person (not per sample); greedy is inherently sequential
        f = int(np.argmin(load))
        person_fold[p] = f
        load[f] += counts[p]
    return person_fold[person]


def make_split(protocol: str, ages: np.ndarray, identities: np.ndarray, k: int = 5, seed: int = 0) -> tuple[np.ndarray, dict]:
    """One built-in protocol (BUILTIN) and its description for `splits/<name>.json`."""
    ages = np.asarray(ages)
    if protocol == "lopo":
        folds, level, rule = lopo(identities), "person", "fold = the person's rank among the sorted identities"
        seed_used = None
    elif protocol == "rs":
        folds, level, rule = random_split(len(ages), k, seed), "image", "seeded permutation dealt round-robin"
        seed_used = seed
    elif protocol == "se":
        folds, level = subject_exclusive(ages, identities, k, seed), "person"
        rule = "persons sorted by mean age, dealt in blocks of k with a seeded shuffle inside each block"
        seed_used = seed
    elif protocol == "kfold":
        folds, level = kfold(identities, k, seed), "person"
        rule = "persons in seeded order, largest first, each to the fold with the fewest images"
        seed_used = seed
    else:
        raise SplitError(f"unknown protocol {protocol!r} (known: {', '.join(BUILTIN)})")
    return folds, {"protocol": protocol, "level": level, "seed": seed_used, "rule": rule, **describe(folds, ages, identities)}


def describe(folds: np.ndarray, ages: np.ndarray, identities: np.ndarray) -> dict:
    """Per-fold sample counts, person counts and mean ages (folds with many entries, like LOPO's
    82, get counts only); and how many samples are in no fold."""
    folds = np.asarray(folds)
    k = int(folds.max()) + 1 if folds.size else 0
    inside = folds >= 0
    sizes = np.bincount(folds[inside], minlength=k)
    info = {"sizes": sizes.tolist(), "unassigned": int((~inside).sum())}
    if k <= 20:
        person, _ = _persons(identities)
        ages = np.asarray(ages, np.float64)
        info["persons"] = [int(np.unique(person[folds == f]).size) for f in range(k)]
        info["mean_age"] = [round(float(ages[folds == f].mean()), 2) if sizes[f] else None for f in range(k)]
    return info


# --- published split lists ------------------------------------------------------------------------

_NAME_OK = re.compile(r"^[A-Za-z0-9_-]+$")


def check_split_name(name: str) -> None:
    """A split name is a file stem under splits/: letters, digits, '_' and '-', not a built-in's."""
    if not _NAME_OK.match(name or ""):
        raise SplitError(f"split name {name!r}: use letters, digits, '_' and '-'")
    if name in BUILTIN:
        raise SplitError(f"split name {name!r} is a built-in protocol; choose another name")


def parse_split_list(text: str, origin: str = "<split list>") -> list[tuple[str, int]]:
    """Lines "file_name fold" or "file_name,fold" (whitespace, tab or comma; blank lines and
    '#' comments skipped; a first line whose fold is not a number is a header). Returns
    (file name, fold label) pairs; raises SplitError naming the line that does not parse."""
    entries: list[tuple[str, int]] = []
    seen_data = False
    for number, line in enumerate(io.StringIO(text), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "," in line:
            parts = next(csv.reader([line]))
            name, label = ",".join(parts[:-1]).strip(), parts[-1].strip()
        else:
            parts = line.rsplit(None, 1)
            name, label = (parts[0], parts[1]) if len(parts) == 2 else (parts[0], "")
        try:
            fold = int(label)
        except ValueError:
            if not seen_data and label:
                seen_data = True  # a header line such as "file,fold"
                continue
            raise SplitError(f"{origin} line {number}: expected 'file_name fold', got {line!r}") from None
        seen_data = True
        entries.append((name, fold))
    if not entries:
        raise SplitError(f"{origin}: no 'file_name fold' lines")
    return entries


def read_split_list(path: Path | str) -> list[tuple[str, int]]:
    """`parse_split_list` of a file; SplitError names the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SplitError(f"{path}: cannot read the split list ({e.strerror or e})") from e
    return parse_split_list(text, str(path))


def _base(name: str) -> str:
    # Match case-insensitively: copies of FG-NET name the same photo 001A02.JPG and 001a02.jpg.
    return PurePosixPath(name.replace("\\", "/")).name.lower()


def import_split(sources: Sequence[str], entries: Sequence[tuple[str, int]], origin: str = "<split list>") -> tuple[np.ndarray, dict]:
    """Folds of samples from a published list, matched by file name (the basename of each source,
    case-insensitively).

    Fold labels are renumbered 0..m-1 in sorted order (lists count from 0 or from 1; the mapping
    is in the returned info as `fold_labels`); a negative label means "in no fold". Samples absent
    from the list get -1 (`missing`); list names matching no sample are `unknown`. Raises
    SplitError when a name is listed with two folds or when nothing matches.
    """
    label_of: dict[str, int] = {}
    for name, label in entries:
        b = _base(name)
        if label_of.get(b, label) != label:
            raise SplitError(f"{origin}: {name!r} is listed in fold {label_of[b]} and in fold {label}")
        label_of[b] = label
    labels = sorted({v for v in label_of.values() if v >= 0})
    renumber = {v: i for i, v in enumerate(labels)}
    # One pass over the samples; what is kept besides the folds is bounded by the list's length.
    folds = np.full(len(sources), -1, np.int64)
    counts: dict[str, int] = {}  # samples of each listed name that matched
    for i, source in enumerate(sources):
        b = _base(source)
        label = label_of.get(b)
        if label is not None:
            counts[b] = counts.get(b, 0) + 1
            folds[i] = renumber.get(label, -1)
    if not counts:
        example = sources[0] if len(sources) else "none"
        raise SplitError(
            f"{origin}: none of its {len(label_of)} file names matches a sample (e.g. sample {example!r}, "
            f"listed {entries[0][0]!r})"
        )
    unknown = sorted(n for n in label_of if n not in counts)
    matched = sum(counts.values())
    missing = len(sources) - matched
    info = {
        "protocol": "import",
        "level": "list",
        "source": str(origin),
        "fold_labels": labels,
        "listed": len(label_of),
        "matched": int(matched),
        "missing": missing,
        "unknown": len(unknown),
        "unknown_examples": unknown[:10],
        "ambiguous": int(sum(1 for c in counts.values() if c > 1)),
    }
    return folds, info
