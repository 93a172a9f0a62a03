"""Large hash buckets are split again on their free bits; the split must stay exact."""

from __future__ import annotations

import numpy as np
import pytest

from curation.dedup import sub_buckets
from curation.dedup.binary import hamming
from curation.dedup.multi_index import _bucket_candidates, bucket_keys, key_scheme
from curation.partitioned.keys import partition_of


def brute_force(codes: np.ndarray, radius: int) -> set[tuple[int, int]]:
    i, j = np.triu_indices(len(codes), 1)
    near = hamming(codes[i], codes[j]) <= radius
    return set(zip(i[near].tolist(), j[near].tolist()))


def clustered_codes(n: int, nbytes: int, radius: int, seed: int) -> np.ndarray:
    """Distinct codes in tight clusters (many pairs within the radius, agreeing on several ranges
    at once, the case where a pair could be reported twice) plus random ones."""
    rng = np.random.default_rng(seed)
    centres = rng.integers(0, 256, (n // 20, nbytes), dtype=np.uint8)
    flips = np.zeros((n, nbytes * 8), np.uint8)
    for row, k in enumerate(rng.integers(0, radius + 2, n)):
        flips[row, rng.choice(nbytes * 8, k, replace=False)] = 1
    codes = centres[rng.integers(0, len(centres), n)] ^ np.packbits(flips, axis=1)
    codes[: n // 4] = rng.integers(0, 256, (n // 4, nbytes), dtype=np.uint8)
    view = codes.view(np.dtype((np.void, nbytes))).ravel()
    return codes[np.sort(np.unique(view, return_index=True)[1])]


def as_set(i: np.ndarray, j: np.ndarray) -> list[tuple[int, int]]:
    return sorted(zip(np.minimum(i, j).tolist(), np.maximum(i, j).tolist()))


@pytest.mark.parametrize("nbytes, radius", [(8, 6), (8, 2), (16, 4)])
def test_split_buckets_find_exactly_the_pairs_within_the_radius_once_each(monkeypatch, nbytes, radius):
    monkeypatch.setattr(sub_buckets, "SPLIT_MIN", 40)  # so sub-buckets are split again (recursion)
    monkeypatch.setattr(sub_buckets, "SUB_BUCKET_TARGET", 8)
    codes = clustered_codes(1500, nbytes, radius, seed=nbytes + radius)
    bits = np.unpackbits(codes, axis=1)
    # Two buckets whose codes are not even required to agree on a fixed substring: every bit free.
    buckets = [np.arange(0, 900), np.arange(900, len(codes))]
    i, j = sub_buckets.pairs_in_large_buckets(codes, bits, buckets, np.arange(nbytes * 8), radius)
    found = as_set(i, j)
    expected = sorted(p for p in brute_force(codes, radius) if (p[0] < 900) == (p[1] < 900))
    assert len(expected) > 100
    assert found == expected  # every pair, nothing farther, none twice


def test_a_bucket_with_no_bits_left_to_split_is_compared_whole(monkeypatch):
    monkeypatch.setattr(sub_buckets, "SPLIT_MIN", 4)
    codes = clustered_codes(300, 8, 6, seed=3)
    bits = np.unpackbits(codes, axis=1)
    i, j = sub_buckets.pairs_in_large_buckets(codes, bits, [np.arange(len(codes))], np.arange(5), 6)
    assert as_set(i, j) == sorted(brute_force(codes, 6))


@pytest.mark.parametrize("radius", [1, 2, 6])
def test_a_pair_whose_first_equal_substring_is_t_agrees_on_one_of_bucket_ts_ranges(radius):
    """The ranges of bucket t (``first_bucket_ranges``) may be fewer than r + 1 because the pairs
    it keeps differ on every earlier substring: at most r - t differences are left for the later
    bits, and in the last bucket each earlier substring differs in exactly one bit."""
    scheme = key_scheme(64, radius)
    rng = np.random.default_rng(radius)
    for t, (a, b) in enumerate(scheme.bounds):
        x = np.unpackbits(rng.integers(0, 256, (3000, 8), dtype=np.uint8), axis=1)
        y = x.copy()
        others = np.r_[0:a, b:64]
        for row in range(len(y)):  # one difference in each earlier substring, the rest anywhere but t
            flips = [rng.integers(lo, hi) for lo, hi in scheme.bounds[:t]]
            spare = rng.integers(0, radius - t + 1)
            flips += list(rng.choice(np.setdiff1d(others, flips), spare, replace=False))
            y[row, flips] ^= 1
        assert (hamming(np.packbits(x, axis=1), np.packbits(y, axis=1)) <= radius).all()
        for width in (1, 3, 7, 12):
            ranges = sub_buckets.first_bucket_ranges(scheme.bounds, t, radius)(width)
            assert ranges and all(len(p) > 0 and not np.isin(p, np.arange(a, b)).any() for p in ranges)
            agree = np.stack([(x[:, p] == y[:, p]).all(axis=1) for p in ranges])
            assert agree.any(axis=0).all(), (t, width)
            assert len(ranges) <= (radius - t + 1 if t < radius else 2 ** t)


@pytest.mark.parametrize("mode, fixed", [("substrings", "first"), ("substrings", "last"), ("pairs", "first")])
def test_the_partition_search_with_split_buckets_equals_the_whole_search(monkeypatch, mode, fixed):
    """What a bucket partition's reduce finds is the same whether its large buckets are compared
    whole (FAISS flat) or split. Low-entropy first (or last: the buckets split on combinations
    of halves) bytes make buckets of hundreds of codes."""
    codes = clustered_codes(4000, 8, 6, seed=11)
    rng = np.random.default_rng(5)
    cols = slice(0, 3) if fixed == "first" else slice(5, 8)
    codes[:, cols] = np.array([[0, 0, 0], [255, 0, 17], [1, 2, 3]], np.uint8)[rng.integers(0, 3, len(codes))]
    codes = np.unique(codes, axis=0)
    scheme = key_scheme(64, 6, mode)
    keys = bucket_keys(codes, scheme)
    here = partition_of(keys.reshape(-1).view(np.int64), 1).reshape(keys.shape) == 0

    def found(split_min: int) -> list[tuple[int, int]]:
        monkeypatch.setattr(sub_buckets, "SPLIT_MIN", split_min)
        pairs = set()
        for i, j, t in _bucket_candidates(codes, keys, here, 6, "auto", scheme):
            first = np.argmax(keys[:, i] == keys[:, j], axis=0)
            pairs |= set(as_set(i[first == t], j[first == t]))
        return sorted(pairs)

    sizes = np.unique(keys[here], return_counts=True)[1]
    assert sizes.max() >= 300
    whole = found(10**9)
    assert whole == sorted(brute_force(codes, 6)) and len(whole) > 100
    assert found(64) == whole
