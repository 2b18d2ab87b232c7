"""Identity-disjoint triplets (anchor, positive, negative) for one epoch, drawn by Numba kernels.

The paper (Chae et al., arXiv 2308.11896) pairs every anchor `x_a` with

    a positive from P(x_a) = {x : age = age_a and identity != identity_a}   (Eq. 1)
    a negative from N(x_a) = {x : age != age_a and identity != identity_a}  (Eq. 5)

`TripletSampler(ages, identities)` builds its tables once; `.epoch(seed, epoch, rank, world_size)`
returns `Triplets`: every sample is an anchor exactly once per epoch in a seeded random order, rank
`r` of `world_size` gets a contiguous slice of that order, and each positive and negative is drawn
exactly uniformly from its set. Indices are positions into the `ages` / `identities` arrays given.

Layout of the tables: samples sorted by (age, identity, position) (the "sorted order"). An age is a
contiguous bucket of it and one identity's samples of one age (a "cell") a contiguous run inside
the bucket, so a positive is `u` in [0, bucket - cell) with the cell skipped. A negative is `u`
over the sorted order with the anchor's bucket removed and the anchor identity's other samples
skipped: those are a short sorted list, so the skip is a binary search. No rejection, no bias.

The epoch is a uniform random permutation `slot` of the sorted positions (Fisher-Yates); the
kernel walks the anchors in sorted order, so its tables are read sequentially, and writes each
triplet at its slot. Rank r keeps the slots of `rank_slice(N, r, world_size)`.

Randomness is a counter-based generator (splitmix64 over a key made from `(seed, epoch)`): draw
`k` of an epoch is a pure function of `(seed, epoch, k)`, and a triplet's draws are keyed by its
slot. So the kernels need no global state, the same numbers come out with and without JIT
(`NUMBA_DISABLE_JIT=1`), and a rank's slice is exactly the matching slice of the single-process
epoch, whatever `world_size` is.

Ages without a positive (every sample of that age is one person) fall back to the nearest age (in
years) that holds a sample of another identity, and the positive is drawn uniformly from that
age's samples of other identities; when a younger and an older age are equally near, a fair coin
picks one per anchor, so the fallback leans neither way. `Triplets.fallback_count` counts the
anchors of the slice that fell back; `TripletSampler.fallback_ages` lists the ages concerned.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import numpy as np
from numba import njit

# One JIT policy for every kernel. cache=True: compiled once, then loaded from __pycache__/ next to
# this file (or NUMBA_CACHE_DIR). nogil=True: a trainer may draw the next epoch in a thread.
_jit = functools.partial(njit, cache=True, nogil=True)
# Helpers are inlined into the kernel at Numba's IR level: a real call passing arrays costs
# reference counting and argument unpacking, measured at ~200 ns a draw against ~10 inlined.
_inline = functools.partial(_jit, inline="always")

# splitmix64 constants (Steele, Lea, Flood 2014), as uint64 so that no arithmetic leaves uint64
# (numba and numpy turn uint64 op int64 into float64).
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_MASK32 = np.uint64(0xFFFFFFFF)
_TWO32 = np.uint64(1 << 32)
_ONE = np.uint64(1)
_S27, _S30, _S31, _S32 = np.uint64(27), np.uint64(30), np.uint64(31), np.uint64(32)

# Counter streams: draw k of stream s uses counter 4 * k + s.
_STREAM_SHUFFLE, _STREAM_POSITIVE, _STREAM_NEGATIVE, _STREAM_TIE = 0, 1, 2, 3

# Columns of the table `info` (N, 8) int32: one 32-byte row per sorted position, all positions
# in the sorted order. int32 keeps the tables of a MORPH-sized set (~2.2 MB) in a core's L2.
_BUCKET = 0  # first position of the sample's age bucket
_BUCKET_LEN = 1  # samples of that age
_CELL = 2  # first position of the sample's cell (same age, same identity)
_CELL_LEN = 3  # samples in the cell
_ID_START = 4  # where the identity's positions start in `idlist`
_ID_LEN = 5  # samples of the identity, all ages
_ID_BEFORE = 6  # of those, how many lie before the bucket (younger ages)
_AGE = 7  # age code (index into the sorted distinct ages)

_MAX_SAMPLES = 2**31 - 1  # int32 tables; draws are 32-bit (Lemire)


class Triplets(NamedTuple):
    """One rank's slice of an epoch: three (M,) int64 arrays of sample positions and a count."""

    anchor: np.ndarray  # (M,) int64, every sample of the set once over all ranks
    positive: np.ndarray  # (M,) int64, same age (or the fallback age), another identity
    negative: np.ndarray  # (M,) int64, another age, another identity
    fallback_count: int  # anchors of this slice whose age has no positive (drawn at the fallback age)


# ----------------------------------------------------------------------------------------------
# Compiled kernels. They allocate nothing: outputs and scratch arrive preallocated.


@_inline
def _mix(z):
    """splitmix64's finaliser: a bijection of uint64 that scatters every input bit."""
    z = (z ^ (z >> _S30)) * _MUL1
    z = (z ^ (z >> _S27)) * _MUL2
    return z ^ (z >> _S31)


@_inline
def _epoch_key(seed, epoch):
    """uint64 key of (seed, epoch); hashed as a pair so (s, e + 1) and (s + 1, e) differ."""
    return _mix(_mix(seed + _GOLDEN) ^ epoch)


@_inline
def _random(key, counter):
    """64 random bits for draw `counter` (int64 >= 0) of an epoch: splitmix64 at that counter."""
    return _mix(key + np.uint64(counter) * _GOLDEN)


@_inline
def _below(h, n):
    """Exactly uniform int64 in [0, n), 1 <= n < 2**32, from the random bits h.

    Lemire's multiply-shift with rejection (2019) on each 32-bit half of h; when both halves are
    rejected (probability < (n / 2**32)**2), h is mixed again.
    """
    nn = np.uint64(n)
    while True:
        for half in range(2):
            r = (h >> _S32) if half == 0 else (h & _MASK32)
            m = r * nn
            low = m & _MASK32
            if low >= nn or low >= (_TWO32 - nn) % nn:
                return np.int64(m >> _S32)
        h = _mix(h + _GOLDEN)


@_inline
def _lower_bound(a, lo, hi, x):
    """First index in [lo, hi) of the sorted integer array a with a[index] >= x (hi if none)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if a[mid] < x:
            lo = mid + 1
        else:
            hi = mid
    return lo


@_inline
def _positive_range(p, choice, info, idlist, bucket_start, fallback):
    """Where the positive of the anchor at sorted position p comes from: (start, count, run, run_len).

    The positive is at sorted position q = start + u for u uniform in [0, count), plus run_len if
    q >= run: the bucket of the target age with the anchor identity's run skipped. The target is
    the anchor's age, or for an age without positive its fallback `fallback[age, choice]`.
    """
    n = info[p, _BUCKET_LEN]
    k = info[p, _CELL_LEN]
    if n > k:
        return info[p, _BUCKET], n - k, info[p, _CELL], k
    # Every sample of this age is the anchor's identity: take the fallback age's bucket and skip
    # the identity's run there, if it has one (its positions are sorted in idlist).
    t = fallback[info[p, _AGE], choice]
    s = bucket_start[t]
    e = bucket_start[t + 1]
    a = info[p, _ID_START]
    b = a + info[p, _ID_LEN]
    r0 = _lower_bound(idlist, a, b, s)
    r1 = _lower_bound(idlist, r0, b, e)
    run = idlist[r0] if r1 > r0 else e
    return s, (e - s) - (r1 - r0), run, r1 - r0


@_inline
def _negative_count(p, info, n_all):
    """|N(x_p)|: all samples minus the anchor's age bucket minus its identity's other ages."""
    return n_all - info[p, _BUCKET_LEN] - (info[p, _ID_LEN] - info[p, _CELL_LEN])


@_inline
def _negative_at(p, u, info, idlist):
    """Sorted position of the u-th element (0 <= u < |N(x_p)|) of N(x_p), in sorted order.

    Drop the anchor's bucket [s, s + n) from the sorted order: position x maps to x (x < s) or
    x + n. In those compressed coordinates the identity's remaining samples E_0 < E_1 < ... must
    be skipped; the u-th survivor is u + #{j : E_j - j <= u}, and E_j - j never decreases, so the
    count is a binary search over the identity's m - k positions.
    """
    s = info[p, _BUCKET]
    n = info[p, _BUCKET_LEN]
    k = info[p, _CELL_LEN]
    a = info[p, _ID_START]
    before = info[p, _ID_BEFORE]
    lo = 0
    hi = info[p, _ID_LEN] - k
    while lo < hi:
        mid = (lo + hi) >> 1
        # E_mid: younger positions are unchanged, older ones shift down past the removed bucket.
        e = idlist[a + mid] if mid < before else idlist[a + mid + k] - n
        if e - mid <= u:
            lo = mid + 1
        else:
            hi = mid
    x = u + lo
    return x if x < s else x + n


@_jit
def _epoch_kernel(seed, epoch, lo, hi, info, order, idlist, bucket_start, fallback, slot, anchor, positive, negative):
    """Fill anchor/positive/negative with the triplets of epoch slots [lo, hi); return the fallbacks.

    seed, epoch: uint64. info (N, 8), order (N,), idlist (N,): int32 tables; bucket_start (G + 1,),
    fallback (G, 2): int64. slot (N,) int64 scratch. anchor, positive, negative: (hi - lo,) int64.
    """
    n_all = order.shape[0]
    key = _epoch_key(seed, epoch)
    # slot[p]: where the anchor at sorted position p lands in the epoch. Fisher-Yates: uniform.
    for p in range(n_all):
        slot[p] = p
    for p in range(n_all - 1, 0, -1):
        r = _below(_random(key, 4 * p + _STREAM_SHUFFLE), p + 1)
        t = slot[p]
        slot[p] = slot[r]
        slot[r] = t
    # Anchors in sorted order: `info` and `order` stream through the cache instead of being read
    # at random (3x faster on MORPH-sized sets); the writes go to the slots.
    fallbacks = 0
    for p in range(n_all):
        j = slot[p]
        if j < lo or j >= hi:
            continue
        anchor[j - lo] = order[p]
        choice = 0
        if info[p, _BUCKET_LEN] == info[p, _CELL_LEN]:
            fallbacks += 1
            g = info[p, _AGE]
            if fallback[g, 0] != fallback[g, 1]:  # two fallback ages equally near: a fair coin
                choice = np.int64(_random(key, 4 * j + _STREAM_TIE) & _ONE)
        start, count, run, run_len = _positive_range(p, choice, info, idlist, bucket_start, fallback)
        q = start + _below(_random(key, 4 * j + _STREAM_POSITIVE), count)
        if q >= run:
            q += run_len
        positive[j - lo] = order[q]
        u = _below(_random(key, 4 * j + _STREAM_NEGATIVE), _negative_count(p, info, n_all))
        negative[j - lo] = order[_negative_at(p, u, info, idlist)]
    return fallbacks


# ----------------------------------------------------------------------------------------------
# Tables and the public API.


def rank_slice(n: int, rank: int = 0, world_size: int = 1) -> tuple[int, int]:
    """Positions [lo, hi) of an epoch of n anchors that `rank` of `world_size` gets.

    Contiguous, disjoint, complete; lengths differ by at most one between ranks.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    return rank * n // world_size, (rank + 1) * n // world_size


def _as_labels(x, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be a 1-D array, got shape {a.shape}")
    if a.dtype == np.bool_ or not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    return a.astype(np.int64)


def _as_u64(x: int, name: str) -> np.uint64:
    if not isinstance(x, (int, np.integer)) or isinstance(x, bool):
        raise TypeError(f"{name} must be an integer, got {x!r}")
    return np.uint64(int(x) & 0xFFFFFFFFFFFFFFFF)  # negative seeds wrap, as in two's complement


class TripletSampler:
    """Triplet tables of one training set, built once; `.epoch()` draws an epoch's triplets.

    ages, identities: (N,) integer arrays (one row per sample of the split). Raises ValueError
    when some anchor can have no negative: fewer than 2 samples, one identity, one age, or a
    sample whose age every sample of another identity shares.

    Attributes: `age_values`, `identity_values` (sorted distinct labels), `fallback_ages`
    ({age without positive: (its fallback age,) or (younger, older) on a tie}), `fallback_samples`
    (anchors that fall back in every full epoch: fixed by the labels).
    """

    def __init__(self, ages, identities):
        ages = _as_labels(ages, "ages")
        identities = _as_labels(identities, "identities")
        if ages.shape != identities.shape:
            raise ValueError(f"ages and identities differ in length: {ages.shape[0]} vs {identities.shape[0]}")
        n_all = ages.shape[0]
        if n_all < 2:
            raise ValueError(f"need at least 2 samples to draw triplets, got {n_all}")
        if n_all > _MAX_SAMPLES:
            raise ValueError(f"at most {_MAX_SAMPLES} samples, got {n_all}")
        self.age_values, age_code = np.unique(ages, return_inverse=True)  # (G,), (N,)
        self.identity_values, id_code = np.unique(identities, return_inverse=True)  # (D,), (N,)
        n_ages, n_ids = len(self.age_values), len(self.identity_values)
        if n_ids < 2:
            raise ValueError(
                f"all {n_all} samples belong to one identity ({self.identity_values[0]}): "
                "no positive or negative of another identity exists"
            )
        if n_ages < 2:
            raise ValueError(f"all {n_all} samples have age {self.age_values[0]}: no negative of another age exists")

        # Sorted order: by (age, identity, position); lexsort is stable, so position breaks ties.
        order = np.lexsort((id_code, age_code))  # (N,) int64: the sample at each sorted position
        sorted_age, sorted_id = age_code[order], id_code[order]  # (N,) int64 codes, by position
        age_count = np.bincount(age_code, minlength=n_ages)  # (G,)
        bucket_start = np.zeros(n_ages + 1, np.int64)  # (G + 1,)
        np.cumsum(age_count, out=bucket_start[1:])
        cell_key = sorted_age * n_ids + sorted_id  # (N,) int64, ascending
        cell = np.searchsorted(cell_key, cell_key, "left")  # (N,) first position of each cell
        cell_len = np.searchsorted(cell_key, cell_key, "right") - cell
        # idlist: sorted positions grouped by identity, ascending within each identity.
        idlist = np.argsort(sorted_id, kind="stable")  # (N,) int64
        id_count = np.bincount(id_code, minlength=n_ids)  # (D,)
        id_start = np.concatenate(([0], np.cumsum(id_count)[:-1]))  # (D,)
        where_in_idlist = np.empty(n_all, np.int64)
        where_in_idlist[idlist] = np.arange(n_all)

        info = np.empty((n_all, 8), np.int32)  # (N, 8), row p: the anchor at sorted position p
        info[:, _BUCKET] = bucket_start[sorted_age]
        info[:, _BUCKET_LEN] = age_count[sorted_age]
        info[:, _CELL] = cell
        info[:, _CELL_LEN] = cell_len
        info[:, _ID_START] = id_start[sorted_id]
        info[:, _ID_LEN] = id_count[sorted_id]
        info[:, _ID_BEFORE] = where_in_idlist[cell] - id_start[sorted_id]
        info[:, _AGE] = sorted_age

        # int64 from the source columns (not a widened copy of the whole table: 64 bytes a sample).
        neg_count = n_all - age_count[sorted_age] - (id_count[sorted_id] - cell_len)
        if (neg_count <= 0).any():
            i = int(order[np.argmax(neg_count <= 0)])
            raise ValueError(
                f"sample {i} (age {ages[i]}, identity {identities[i]}) has no negative: every sample "
                f"of another identity has age {ages[i]}"
            )

        self._fallback, self.fallback_ages = self._fallback_table(sorted_id, bucket_start)
        self._info = info
        self._order = order.astype(np.int32)
        self._idlist = idlist.astype(np.int32)
        self._bucket_start = bucket_start
        self._sorted_id = sorted_id
        self._cell_key = cell_key
        # Anchors that fall back each epoch (fixed by the labels: ages held by one identity).
        self.fallback_samples = int((info[:, _BUCKET_LEN] == info[:, _CELL_LEN]).sum())

    def _fallback_table(self, sorted_id, bucket_start):
        """(G, 2) int64 fallback age codes of ages without positive (-1 elsewhere), and a dict.

        For an age whose samples are all identity d: the nearest other age (in years) holding a
        sample not of d. Columns 0 and 1 are the younger and older candidate when both are equally
        near, else the same age twice.
        """
        n_ages = len(bucket_start) - 1
        first_id = sorted_id[bucket_start[:-1]]  # (G,) smallest identity of each age
        last_id = sorted_id[bucket_start[1:] - 1]  # (G,) largest identity of each age
        table = np.full((n_ages, 2), -1, np.int64)
        readable = {}
        for g in np.flatnonzero(first_id == last_id):  # ages held by one identity
            d = first_id[g]
            other = (first_id != d) | (last_id != d)  # ages with a sample not of d
            other[g] = False
            dist = np.where(other, np.abs(self.age_values - self.age_values[g]), np.iinfo(np.int64).max)
            near = np.flatnonzero(dist == dist.min())  # 1 or 2 codes, ascending (younger first)
            table[g] = near[0], near[-1]
            readable[int(self.age_values[g])] = tuple(int(self.age_values[t]) for t in near)
        return table, readable

    def __len__(self) -> int:
        return self._order.shape[0]

    def epoch(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Triplets:
        """This rank's triplets of one epoch, drawn by the compiled kernel (deterministic).

        The same (seed, epoch) gives the same epoch on every rank; concatenating the slices of
        ranks 0..world_size-1 gives exactly the world_size=1 result.
        """
        lo, hi = rank_slice(len(self), rank, world_size)
        s, e = _as_u64(seed, "seed"), _as_u64(epoch, "epoch")
        slot = np.empty(len(self), np.int64)  # scratch, per call: the sampler stays thread-safe
        anchor, positive, negative = (np.empty(hi - lo, np.int64) for _ in range(3))
        # uint64 wraps on purpose; only the pure-Python run (NUMBA_DISABLE_JIT=1) would warn.
        with np.errstate(over="ignore"):
            fallbacks = _epoch_kernel(
                s, e, lo, hi, self._info, self._order, self._idlist, self._bucket_start, self._fallback,
                slot, anchor, positive, negative,
            )  # fmt: skip
        return Triplets(anchor, positive, negative, int(fallbacks))

    def epoch_numpy(self, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Triplets:
        """The same sampling in vectorised NumPy: the reference the benchmark measures against.

        Same constraints and distributions as `epoch`, other numbers (numpy's Generator). Negatives
        are drawn by rejection: uniform outside the anchor's age bucket, redrawn while of the
        anchor's identity (each round keeps a fraction |N(x_a)| / (N - bucket) of those left).
        """
        n_all = len(self)
        lo, hi = rank_slice(n_all, rank, world_size)
        rng = np.random.default_rng([int(_as_u64(seed, "seed")), int(_as_u64(epoch, "epoch"))])
        pos = rng.permutation(n_all)[lo:hi]  # (M,) int64 sorted positions of the anchors
        anchor = self._order[pos].astype(np.int64)
        info = self._info[pos].astype(np.int64)  # (M, 8)
        g = info[:, _AGE]
        d = self._sorted_id[pos]
        # Positive: the target age is the anchor's own, or its fallback (a coin between two).
        fell_back = info[:, _BUCKET_LEN] == info[:, _CELL_LEN]
        target = g.copy()
        fb = self._fallback[g[fell_back]]
        coin = rng.integers(0, 2, size=len(fb))
        target[fell_back] = fb[np.arange(len(fb)), coin]
        s = self._bucket_start[target]
        key = target * len(self.identity_values) + d
        run = np.searchsorted(self._cell_key, key, "left")
        run_len = np.searchsorted(self._cell_key, key, "right") - run
        q = s + rng.integers(0, self._bucket_start[target + 1] - s - run_len)
        q += run_len * (q >= run)
        positive = self._order[q].astype(np.int64)
        # Negative: uniform over positions outside the bucket, rejecting the anchor's identity.
        negative = np.empty_like(anchor)
        todo = np.arange(len(anchor))
        while len(todo):
            s, n = info[todo, _BUCKET], info[todo, _BUCKET_LEN]
            p = rng.integers(0, n_all - n)
            p += n * (p >= s)
            negative[todo] = self._order[p]
            todo = todo[self._sorted_id[p] == d[todo]]
        return Triplets(anchor, positive, negative, int(fell_back.sum()))


def draw_triplets(ages, identities, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Triplets:
    """One epoch of triplets for (ages, identities): `TripletSampler(ages, identities).epoch(...)`.

    Build a `TripletSampler` once instead when drawing many epochs.
    """
    return TripletSampler(ages, identities).epoch(seed, epoch, rank, world_size)


def draw_triplets_numpy(ages, identities, seed: int, epoch: int, rank: int = 0, world_size: int = 1) -> Triplets:
    """The vectorised NumPy reference of `draw_triplets` (same constraints, other numbers)."""
    return TripletSampler(ages, identities).epoch_numpy(seed, epoch, rank, world_size)
