"""Protocol splits: fold structure, person-disjointness, balance, seeds, imported lists."""

import numpy as np
import pytest

from agecl import splits
from agecl.splits import SplitError


def _people(persons=200, seed=0):
    """ages (n,), identity ids (n,): 1-8 photos a person, each person within a few years."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 9, persons)
    identities = np.repeat(np.arange(persons), counts)
    base = rng.integers(16, 70, persons)
    ages = base[identities] + rng.integers(0, 4, identities.size)
    return ages, identities


def _disjoint(folds, identities):
    return all(np.unique(folds[identities == p]).size == 1 for p in np.unique(identities))


def test_lopo_one_person_per_fold():
    identities = np.array([5, 5, 9, 1, 9, 1, 1])
    folds = splits.lopo(identities)
    assert folds.tolist() == [1, 1, 2, 0, 2, 0, 0]  # the person's rank among sorted identities
    for f in range(3):
        assert np.unique(identities[folds == f]).size == 1


def test_rs_sizes_balanced_and_seeded():
    folds = splits.random_split(103, 5, seed=3)
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 103
    assert np.array_equal(folds, splits.random_split(103, 5, seed=3))
    assert not np.array_equal(folds, splits.random_split(103, 5, seed=4))


def test_se_person_disjoint_and_age_balanced():
    ages, identities = _people(400)
    folds = splits.subject_exclusive(ages, identities, 5, seed=0)
    assert set(np.unique(folds)) == set(range(5))
    assert _disjoint(folds, identities)
    persons = [np.unique(identities[folds == f]).size for f in range(5)]
    assert max(persons) - min(persons) <= 1
    means = [ages[folds == f].mean() for f in range(5)]
    assert max(means) - min(means) < 2.0, means  # ages span 16-73: random folds would differ more
    assert np.array_equal(folds, splits.subject_exclusive(ages, identities, 5, seed=0))
    assert not np.array_equal(folds, splits.subject_exclusive(ages, identities, 5, seed=1))


def test_kfold_person_disjoint_balanced_in_images():
    ages, identities = _people(300, seed=1)
    folds = splits.kfold(identities, 5, seed=0)
    assert _disjoint(folds, identities)
    sizes = np.bincount(folds)
    assert sizes.max() - sizes.min() <= 8  # at most one person's photos apart
    assert np.array_equal(folds, splits.kfold(identities, 5, seed=0))
    with pytest.raises(SplitError, match="at least 5 persons"):
        splits.kfold(np.array([0, 0, 1, 2]), 5)


def test_make_split_describes_itself():
    ages, identities = _people(50)
    folds, info = splits.make_split("se", ages, identities, 5, seed=2)
    assert info["protocol"] == "se" and info["level"] == "person" and info["seed"] == 2
    assert sum(info["sizes"]) == ages.size and len(info["mean_age"]) == 5
    assert splits.splits_for("fgnet") == ("lopo", "kfold") and splits.default_protocol("morph") == "se"
    with pytest.raises(SplitError, match="unknown protocol"):
        splits.make_split("loso", ages, identities)


def test_import_split_matched_missing_unknown():
    sources = ["imgs/001A02.JPG", "imgs/001A05.JPG", "imgs/002A10.JPG", "imgs/003A04.JPG"]
    text = "file,fold\n001a02.jpg,1\n001A05.JPG,1\n# a comment\n\n002A10.JPG,2\nghost.jpg,3\n"
    entries = splits.parse_split_list(text)
    folds, info = splits.import_split(sources, entries)
    # Labels 1, 2, 3 become folds 0, 1, 2; 003A04 is not listed: -1.
    assert folds.tolist() == [0, 0, 1, -1]
    assert info["fold_labels"] == [1, 2, 3] and info["missing"] == 1 and info["matched"] == 3
    assert info["unknown"] == 1 and info["unknown_examples"] == ["ghost.jpg"]
    # Whitespace-separated lists parse the same.
    assert splits.parse_split_list("001A02.JPG 1\n002A10.JPG\t2\n") == [("001A02.JPG", 1), ("002A10.JPG", 2)]


def test_import_split_errors():
    with pytest.raises(SplitError, match="matches a sample"):
        splits.import_split(["a.jpg"], [("b.jpg", 0)])
    with pytest.raises(SplitError, match="line 3"):
        splits.parse_split_list("a.jpg 0\nb.jpg 1\nc.jpg one\n")
    with pytest.raises(SplitError, match="in fold 0 and in fold 1"):
        splits.import_split(["a.jpg"], [("a.jpg", 0), ("A.JPG", 1)])
    with pytest.raises(SplitError, match="built-in"):
        splits.check_split_name("lopo")
