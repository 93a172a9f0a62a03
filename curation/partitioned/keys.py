"""Deterministic hashing of integer keys: partition numbers and uid-based samples.

Both execution forms of a stage must pick the same rows (a PCA sample, recall queries) and every
task must route a key to the same partition, whatever the worker, the run or the resume. A
splitmix64 finaliser over the key and a salt does that without any state.
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def mix64(keys, salt: int = 0) -> np.ndarray:
    """splitmix64 of ``keys`` (any integer array, viewed as uint64) xor-ed with ``salt``."""
    x = np.asarray(keys).astype(np.int64, copy=False).view(np.uint64) ^ np.uint64(salt & 0xFFFFFFFFFFFFFFFF)
    with np.errstate(over="ignore"):
        x = x + _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * _M1
        x = (x ^ (x >> np.uint64(27))) * _M2
        return x ^ (x >> np.uint64(31))


def combine(h: np.ndarray, keys) -> np.ndarray:
    """Fold another key column into hashes ``h`` (for multi-column keys)."""
    return mix64(np.asarray(h, np.uint64).view(np.int64) ^ mix64(keys).view(np.int64))


def partition_of(keys, partitions: int, salt: int = 0) -> np.ndarray:
    """Partition in ``[0, partitions)`` of each key."""
    return (mix64(keys, salt) % np.uint64(max(1, partitions))).astype(np.int64)


def sampled(uids, rate: float, salt: int) -> np.ndarray:
    """bool mask: the uids in a Bernoulli(``rate``) sample that depends only on uid and salt."""
    if rate >= 1.0:
        return np.ones(len(np.asarray(uids)), bool)
    threshold = np.uint64(min(int(rate * 2.0**64), 2**64 - 1))
    return mix64(uids, salt) < threshold


def sample_rate(wanted: int, total: int) -> float:
    """The rate that samples about ``wanted`` of ``total`` rows (1.0 = all of them)."""
    return 1.0 if total <= wanted else wanted / max(1, total)
