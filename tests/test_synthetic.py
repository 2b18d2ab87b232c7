"""The generated face-age dataset: labels, determinism, landmarks, and that age is learnable."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from agecl.format import DEFAULT_COVERAGE, IMAGE_SIZE, face_template
from agecl.synthetic import (
    SyntheticSample,
    identity_traits,
    render_face,
    synthetic_labels,
    synthetic_sample,
    synthetic_samples,
)


def test_labels_ranges_and_identities():
    ages, who = synthetic_labels(1000, seed=3)
    assert ages.shape == who.shape == (1000,)
    assert ages.dtype.kind == who.dtype.kind == "i"
    assert ages.min() >= 0 and ages.max() <= 79
    assert len(np.unique(who)) == 100  # n // 10 people by default
    counts = np.bincount(who)
    assert counts.min() >= 2
    # Every decade of life is represented, none dominates.
    share = np.bincount(np.minimum(ages // 10, 7), minlength=8) / len(ages)
    assert share.min() > 0.05 and share.max() < 0.25


def test_labels_options_and_errors():
    ages, who = synthetic_labels(300, seed=1, identities=30, age_range=(16, 77))
    assert ages.min() >= 16 and ages.max() <= 77
    assert len(np.unique(who)) == 30
    again = synthetic_labels(300, seed=1, identities=30, age_range=(16, 77))
    assert np.array_equal(ages, again[0]) and np.array_equal(who, again[1])
    assert not np.array_equal(ages, synthetic_labels(300, seed=2, identities=30, age_range=(16, 77))[0])
    with pytest.raises(ValueError):
        synthetic_labels(10, identities=6)  # fewer than two photos a person
    with pytest.raises(ValueError):
        synthetic_labels(0)
    with pytest.raises(ValueError):
        synthetic_labels(10, age_range=(40, 20))
    with pytest.raises(IndexError):
        synthetic_sample(10, 10)


def test_identity_does_not_determine_age():
    ages, who = synthetic_labels(2000, seed=0)
    spans = np.array([np.ptp(ages[who == p]) for p in range(who.max() + 1)])
    # Each person is photographed over years (banker's rounding can trim a 5-year span to 4).
    assert spans.min() >= 4 and spans.mean() > 12
    # Knowing who it is still leaves years of error: a model must read age from the face.
    means = np.bincount(who, weights=ages) / np.bincount(who)
    assert np.abs(ages - means[who]).mean() > 4


def test_deterministic_and_chunk_independent():
    n, seed = 40, 7
    one_pass = list(synthetic_samples(n, seed, start=5, stop=11))
    chunked = list(synthetic_samples(n, seed, start=8, stop=11)) + list(synthetic_samples(n, seed, start=5, stop=8))
    chunked = chunked[3:] + chunked[:3]  # back in sample order
    alone = synthetic_sample(9, n, seed)
    assert [s.source for s in one_pass] == [s.source for s in chunked]
    for a, b in zip(one_pass, chunked):
        assert a.identity == b.identity and a.age == b.age
        assert a.image.tobytes() == b.image.tobytes() and a.points.tobytes() == b.points.tobytes()
    assert alone.image.tobytes() == one_pass[4].image.tobytes()
    ages, who = synthetic_labels(n, seed)
    for s in one_pass:
        i = int(s.source.rsplit("/", 1)[1].split(".")[0])
        assert s.age == ages[i] and s.identity == f"p{who[i]:04d}"
        assert s.source == f"synthetic/{s.identity}/{i:06d}.png"
    assert synthetic_sample(9, n, seed + 1).image.tobytes() != alone.image.tobytes()
    assert identity_traits(3, seed) == identity_traits(3, seed) != identity_traits(4, seed)


def test_images_and_landmarks_at_the_template():
    template = face_template(IMAGE_SIZE, DEFAULT_COVERAGE)
    for s in synthetic_samples(200, seed=5, start=0, stop=12):
        assert isinstance(s, SyntheticSample)
        assert s.image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and s.image.dtype == np.uint8
        assert s.points.shape == (5, 2) and s.points.dtype == np.float32
        assert np.abs(s.points - template).max() <= 4.0  # alignment residue only
        # The points are where the features are: each eye point falls on the pupil, much darker than
        # the white of the same eye (a ratio, so that lighting and skin tone do not matter).
        grey = cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY).astype(np.int32)
        for x, y in np.rint(s.points[:2]).astype(int):
            assert grey[y, x] < 0.6 * grey[y - 2 : y + 3, x - 14 : x + 15].max()
    rng = np.random.default_rng(0)
    image, points = render_face(35.5, identity_traits(0), rng)  # fractional ages draw too
    assert image.shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and points.shape == (5, 2)


def _ridge_mae(x_train, y_train, x_test, y_test, lam=100.0):
    """Test MAE of ridge regression on standardised features (dual form: fewer samples than pixels)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-3
    z_train, z_test = (x_train - mu) / sd, (x_test - mu) / sd
    alpha = np.linalg.solve(z_train @ z_train.T + lam * np.eye(len(z_train)), y_train - y_train.mean())
    pred = np.clip(z_test @ (z_train.T @ alpha) + y_train.mean(), 0, 79)
    return np.abs(pred - y_test).mean()


def test_age_is_learnable_across_identities():
    # 400 photos of 80 people at 32x32 grey; fit on 60 people, test on the 20 others.
    pixels, ages, people = [], [], []
    for s in synthetic_samples(400, seed=11, identities=80):
        grey = cv2.cvtColor(s.image, cv2.COLOR_RGB2GRAY)
        pixels.append(cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).ravel())
        ages.append(s.age)
        people.append(int(s.identity[1:]))
    x, y, people = np.asarray(pixels, np.float64) / 255, np.asarray(ages, np.float64), np.asarray(people)
    test = people >= 60
    mae = _ridge_mae(x[~test], y[~test], x[test], y[test])
    baseline = np.abs(y[test] - y[~test].mean()).mean()
    assert mae < 0.7 * baseline, (mae, baseline)
