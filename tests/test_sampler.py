"""The triplet sampler against brute-force definitions of P(x_a) (Eq. 1) and N(x_a) (Eq. 5)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agecl import sampler as S
from agecl.sampler import TripletSampler, Triplets, draw_triplets, draw_triplets_numpy, rank_slice

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = settings(max_examples=50, deadline=None)

# Critical values of the chi-square distribution at significance 0.001 (tables; scipy.stats.chi2.ppf).
CHI2_CRIT_001 = {5: 20.515, 6: 22.458}


@st.composite
def datasets(draw, max_n=40):
    """(ages, identities): small label sets with gaps between ages, often impossible on purpose."""
    n = draw(st.integers(0, max_n))
    age_values = draw(st.lists(st.integers(0, 90), min_size=1, max_size=6, unique=True))
    id_values = draw(st.lists(st.integers(-1000, 1000), min_size=1, max_size=7, unique=True))
    ages = draw(st.lists(st.sampled_from(age_values), min_size=n, max_size=n))
    ids = draw(st.lists(st.sampled_from(id_values), min_size=n, max_size=n))
    return np.array(ages, np.int64), np.array(ids, np.int32)


def impossible(ages, ids) -> bool:
    """Some anchor has no negative (or there are fewer than 2 samples): a ValueError is due."""
    if len(ages) < 2:
        return True
    return any(not ((ages != ages[i]) & (ids != ids[i])).any() for i in range(len(ages)))


def positive_set(ages, ids, i):
    """(P(x_i), fell back, allowed ages): Eq. 1, or the nearest ages holding another identity."""
    same = (ages == ages[i]) & (ids != ids[i])
    if same.any():
        return set(np.flatnonzero(same)), False, {ages[i]}
    other = ids != ids[i]
    dist = np.abs(ages - ages[i])
    near = set(ages[other & (dist == dist[other].min())])
    return set(np.flatnonzero(other & np.isin(ages, list(near)))), True, near


def negative_set(ages, ids, i):
    return set(np.flatnonzero((ages != ages[i]) & (ids != ids[i])))


def check_triplets(ages, ids, t: Triplets):
    """Every constraint of one full epoch (world_size 1)."""
    n = len(ages)
    for a in (t.anchor, t.positive, t.negative):
        assert a.dtype == np.int64 and a.shape == (n,)
    assert np.array_equal(np.sort(t.anchor), np.arange(n))  # every sample an anchor, once
    fell = 0
    for a, p, q in zip(t.anchor, t.positive, t.negative):
        pos, fell_back, near = positive_set(ages, ids, a)
        fell += fell_back
        assert p in pos and ids[p] != ids[a] and ages[p] in near
        assert ages[q] != ages[a] and ids[q] != ids[a]
    assert t.fallback_count == fell


@SETTINGS
@given(datasets(), st.integers(0, 2**64 - 1), st.integers(0, 1000))
def test_constraints_hold_or_value_error(data, seed, epoch):
    ages, ids = data
    if impossible(ages, ids):
        with pytest.raises(ValueError):
            TripletSampler(ages, ids)
        return
    check_triplets(ages, ids, draw_triplets(ages, ids, seed, epoch))


@SETTINGS
@given(datasets(), st.integers(0, 2**32), st.integers(0, 1000))
def test_numpy_reference_obeys_the_same_constraints(data, seed, epoch):
    ages, ids = data
    if impossible(ages, ids):
        with pytest.raises(ValueError):
            draw_triplets_numpy(ages, ids, seed, epoch)
        return
    check_triplets(ages, ids, draw_triplets_numpy(ages, ids, seed, epoch))


@SETTINGS
@given(datasets())
def test_each_draw_maps_onto_its_set_one_to_one(data):
    """Exact uniformity: u uniform in [0, count) reaches every member of the set exactly once."""
    ages, ids = data
    if impossible(ages, ids):
        return
    s = TripletSampler(ages, ids)
    n = len(ages)
    for p in range(n):
        i = s._order[p]
        pos, fell_back, near = positive_set(ages, ids, i)
        reached = set()
        for choice in (0, 1) if fell_back else (0,):
            start, count, run, run_len = S._positive_range(p, choice, s._info, s._idlist, s._bucket_start, s._fallback)
            qs = [start + u + (run_len if start + u >= run else 0) for u in range(count)]
            got = [int(s._order[q]) for q in qs]
            assert len(set(got)) == count  # one-to-one
            assert len({ages[x] for x in got}) == 1  # one target age per choice
            reached |= set(got)
        assert reached == pos
        count = S._negative_count(p, s._info, n)
        got = [int(s._order[S._negative_at(p, u, s._info, s._idlist)]) for u in range(count)]
        assert len(set(got)) == count and set(got) == negative_set(ages, ids, i)


@SETTINGS
@given(datasets(), st.integers(1, 6), st.integers(0, 2**20))
def test_rank_slices_are_the_single_process_epoch_cut_up(data, world_size, seed):
    ages, ids = data
    if impossible(ages, ids):
        return
    s = TripletSampler(ages, ids)
    whole = s.epoch(seed, 3)
    parts = [s.epoch(seed, 3, r, world_size) for r in range(world_size)]
    for r, part in enumerate(parts):
        lo, hi = rank_slice(len(ages), r, world_size)
        assert len(part.anchor) == hi - lo
    for field in ("anchor", "positive", "negative"):
        assert np.array_equal(np.concatenate([getattr(t, field) for t in parts]), getattr(whole, field))
    assert sum(t.fallback_count for t in parts) == whole.fallback_count
    # The NumPy reference splits the same way: disjoint, complete.
    anchors = np.concatenate([s.epoch_numpy(seed, 3, r, world_size).anchor for r in range(world_size)])
    assert np.array_equal(np.sort(anchors), np.arange(len(ages)))


def test_rank_slice_bounds():
    assert [rank_slice(10, r, 3) for r in range(3)] == [(0, 3), (3, 6), (6, 10)]
    assert rank_slice(2, 3, 4) == (1, 2) and rank_slice(2, 0, 4) == (0, 0)
    for bad in ((0, 0), (2, 2), (-1, 2)):
        with pytest.raises(ValueError):
            rank_slice(10, *bad)


def _random_set(n=3000, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(16, 78, n), rng.integers(0, n // 4, n)


def test_seeds_and_epochs():
    ages, ids = _random_set()
    s = TripletSampler(ages, ids)
    a, b = s.epoch(7, 2), s.epoch(7, 2)
    assert all(np.array_equal(x, y) for x, y in zip(a[:3], b[:3]))
    # Another epoch or another seed: another order. (seed, epoch) is hashed as a pair, so
    # (7, 3) is not (8, 2).
    others = [s.epoch(7, 3), s.epoch(8, 2), s.epoch(6, 3)]
    for t in others:
        assert not np.array_equal(t.anchor, a.anchor)
    assert not np.array_equal(others[0].anchor, others[1].anchor)
    # Same for the NumPy reference.
    assert np.array_equal(s.epoch_numpy(7, 2).negative, s.epoch_numpy(7, 2).negative)
    assert not np.array_equal(s.epoch_numpy(7, 2).anchor, s.epoch_numpy(7, 3).anchor)


def test_functional_wrapper_is_the_sampler():
    ages, ids = _random_set(500)
    t, u = draw_triplets(ages, ids, 1, 2, 1, 3), TripletSampler(ages, ids).epoch(1, 2, 1, 3)
    assert all(np.array_equal(x, y) for x, y in zip(t[:3], u[:3])) and t.fallback_count == u.fallback_count


def _designed_set():
    """Identity 5 (code A) holds 3,000 photos at age 30: the anchors whose draws are counted.

    P(A at 30) = the 7 photos of identities 1, 3, 7, 9 at age 30 (sorted around A's run).
    N(A at 30) = the 6 photos of identities 2, 8 at 40 and 4, 6 at 20 (A's photos at 20 and 40
    sit between them in the sorted order and must be skipped).
    """
    rows = [(30, 5)] * 3000 + [(30, 1), (30, 3), (30, 3), (30, 7), (30, 9), (30, 9), (30, 9)]
    rows += [(40, 2), (40, 2), (40, 5), (40, 5), (40, 8), (20, 4), (20, 5), (20, 6), (20, 6)]
    ages, ids = np.array(rows).T
    return ages, ids


def _chi2(counts, expected):
    counts = np.asarray(counts, float)
    return float(((counts - expected) ** 2 / expected).sum())


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_positives_and_negatives_uniform(impl):
    ages, ids = _designed_set()
    s = TripletSampler(ages, ids)
    t = s.epoch(12345, 0) if impl == "numba" else s.epoch_numpy(12345, 0)
    mine = ids[t.anchor] == 5
    mine &= ages[t.anchor] == 30
    assert mine.sum() == 3000
    pos_set = np.flatnonzero((ages == 30) & (ids != 5))
    neg_set = np.flatnonzero((ages != 30) & (ids != 5))
    assert len(pos_set) == 7 and len(neg_set) == 6
    pos_counts = [(t.positive[mine] == x).sum() for x in pos_set]
    neg_counts = [(t.negative[mine] == x).sum() for x in neg_set]
    assert sum(pos_counts) == 3000 and sum(neg_counts) == 3000  # nothing outside the sets
    # Pearson's chi-square against uniform; reject at significance 0.001 (fixed seed: no flakes).
    assert _chi2(pos_counts, 3000 / 7) < CHI2_CRIT_001[6], pos_counts
    assert _chi2(neg_counts, 3000 / 6) < CHI2_CRIT_001[5], neg_counts


@pytest.mark.parametrize("impl", ["numba", "numpy"])
def test_fallback_nearest_age_coin_on_ties_and_counted(impl):
    # Age 77: only identity 9 (3 photos); ages 75 and 79 are equally near and hold others (79
    # also holds identity 9, whose photo there must be skipped). Ages 16 and 18: only identity 8;
    # neither can serve the other, both fall back to 20.
    rows = [(77, 9)] * 3 + [(75, 1), (75, 2), (79, 3), (79, 9), (16, 8), (18, 8), (20, 1), (20, 4)]
    ages, ids = np.array(rows).T
    s = TripletSampler(ages, ids)
    assert s.fallback_ages == {77: (75, 79), 16: (20,), 18: (20,)}
    assert s.fallback_samples == 5
    older = total = 0
    for e in range(200):
        t = s.epoch(0, e) if impl == "numba" else s.epoch_numpy(0, e)
        assert t.fallback_count == 5
        check_triplets(ages, ids, t)
        at77 = ages[t.anchor] == 77
        older += (ages[t.positive[at77]] == 79).sum()
        total += at77.sum()
        assert set(ids[t.positive[at77]]) <= {1, 2, 3}  # never identity 9's own photo at 79
    # The coin is fair: |older - total/2| within 4 standard deviations of Binomial(total, 1/2).
    assert abs(older - total / 2) < 4 * np.sqrt(total / 4), (older, total)
    # Split across ranks, the counts add up.
    assert sum(s.epoch(0, 0, r, 4).fallback_count for r in range(4)) == 5


@pytest.mark.parametrize(
    "ages, ids, match",
    [
        ([], [], "at least 2 samples"),
        ([30], [1], "at least 2 samples"),
        ([30, 40, 50], [1, 1, 1], "one identity"),
        ([30, 30, 30], [1, 2, 3], "age 30"),
        ([20, 30, 20], [1, 1, 2], "no negative"),  # sample 0 (20, id 1): other identities only at 20
        ([20, 30], [1, 2, 3], "differ in length"),
        ([20.0, 30.0], [1, 2], "integers"),
        ([[20, 30]], [[1, 2]], "1-D"),
    ],
)
def test_impossible_datasets_raise(ages, ids, match):
    ages, ids = (np.array(x) if len(x) else np.zeros(0, np.int64) for x in (ages, ids))
    with pytest.raises(ValueError, match=match):
        TripletSampler(ages, ids)
    with pytest.raises(ValueError, match=match):
        draw_triplets_numpy(ages, ids, 0, 0)


def test_bad_rank_and_seed():
    s = TripletSampler([20, 30, 20, 30], [1, 2, 3, 4])
    with pytest.raises(ValueError):
        s.epoch(0, 0, rank=2, world_size=2)
    with pytest.raises(TypeError):
        s.epoch(0.5, 0)
    assert np.array_equal(s.epoch(-1, 0).anchor, s.epoch(2**64 - 1, 0).anchor)  # seeds wrap mod 2**64


def test_without_jit_the_same_numbers():
    """NUMBA_DISABLE_JIT=1 runs the kernels as Python and must draw the very same triplets."""
    ages, ids = _random_set(60, seed=3)
    t = TripletSampler(ages, ids).epoch(11, 4, 1, 2)
    code = (
        "import json, numpy as np; from agecl.sampler import TripletSampler;"
        f"t = TripletSampler(np.array({ages.tolist()}), np.array({ids.tolist()})).epoch(11, 4, 1, 2);"
        "print(json.dumps([t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), t.fallback_count]))"
    )
    env = dict(os.environ, NUMBA_DISABLE_JIT="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-W", "error", "-c", code]  # -W error: no overflow warnings either
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [t.anchor.tolist(), t.positive.tolist(), t.negative.tolist(), t.fallback_count]
