"""Near-equal binary codes (perceptual hashes, PCA sign bits) by Hamming radius.

Pairs come from FAISS binary indices with range search, never from a Python double loop:

* ``radius == 0``: equal codes grouped by sorting (linear time, no index at all).
* ``flat``: ``IndexBinaryFlat``, exact brute force in C++ (SIMD popcount); the default while
  N <= ``BINARY_FLAT_MAX``.
* ``multihash``: ``IndexBinaryMultiHash`` (multi-index hashing, Norouzi et al.): the code is cut
  into ``nhash`` substrings of ``b`` bits, each with its own hash table, and each table is
  probed with up to ``nflip = radius // nhash`` flipped bits. Two codes within ``radius`` differ
  in at most ``radius // nhash`` bits on at least one substring (pigeonhole), so the search is
  still exact while touching only a few buckets per query.
"""

from __future__ import annotations

import math
from typing import Literal

import faiss
import numpy as np

BINARY_FLAT_MAX = 50_000
Method = Literal["auto", "flat", "multihash"]


def uint64_to_codes(hashes: np.ndarray) -> np.ndarray:
    """uint64 [n] -> uint8 [n, 8], most significant byte first (the hex order of imagehash)."""
    return np.ascontiguousarray(np.asarray(hashes, dtype=np.uint64).astype(">u8").view(np.uint8).reshape(-1, 8))


def bits_to_codes(bits: np.ndarray) -> np.ndarray:
    """bool [n, nbits] (nbits a multiple of 8) -> packed uint8 [n, nbits / 8]."""
    bits = np.asarray(bits, dtype=bool)
    if bits.shape[1] % 8:
        raise ValueError("the number of bits must be a multiple of 8")
    return np.packbits(bits, axis=1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise Hamming distance between packed codes of equal shape."""
    x = np.bitwise_xor(np.asarray(a, np.uint8), np.asarray(b, np.uint8))
    return np.bitwise_count(x).sum(axis=-1, dtype=np.int64)


def within_radius(codes: np.ndarray, radius: int, kept_codes: np.ndarray | None = None):
    """``passes(kept, candidates)`` for the star rule: Hamming distance between the candidates'
    ``codes`` and the kept row's code (in ``kept_codes``, default the same array) <= ``radius``.
    Codes are compared as 64-bit words (popcount), the fast path for chunks of a giant component."""
    codes = np.ascontiguousarray(codes, np.uint8)
    kept_codes = codes if kept_codes is None else np.ascontiguousarray(kept_codes, np.uint8)
    wide = codes.shape[1] % 8 == 0
    words, kept_words = (codes.view(np.uint64), kept_codes.view(np.uint64)) if wide else (None, None)

    def passes(kept: int, cand: np.ndarray) -> np.ndarray:
        if wide:
            d = np.bitwise_count(words[cand] ^ kept_words[kept]).sum(axis=1, dtype=np.int64)
        else:
            d = hamming(codes[cand], kept_codes[kept][None, :])
        return d <= radius

    return passes


def multihash_layout(n: int, nbits: int) -> tuple[int, int]:
    """(nhash, b): substrings of about log2(n) bits so a bucket holds ~1 random code."""
    b = int(np.clip(round(math.log2(max(n, 2))), 8, min(24, nbits)))
    return max(1, nbits // b), b


def choose_method(n: int, method: Method = "auto") -> str:
    if method != "auto":
        return method
    return "flat" if n <= BINARY_FLAT_MAX else "multihash"


def hamming_pairs(
    codes: np.ndarray, radius: int, method: Method = "auto", query_batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """Pairs ``i < j`` with ``hamming(codes[i], codes[j]) <= radius``, with the connectivity of
    all such pairs: identical codes are folded first (star edges from the first of each group of
    equal codes, distance 0), then the distinct codes are searched and each pair found links the
    first members of the two groups. So a code repeated 10^5 times costs 10^5 edges, not 10^10.

    Returns (i, j, distance, method used). Memory is linear in N plus the number of pairs found
    among distinct codes.
    """
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape if codes.ndim == 2 else (0, 0)
    if radius < 0:
        raise ValueError("radius must be >= 0")
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, "none"
    if radius == 0:
        i, j = _equal_pairs(codes)
        return i, j, np.zeros(len(i), np.int64), "exact-equal"
    si, sj = _equal_pairs(codes)
    view = codes.view(np.dtype((np.void, nbytes))).ravel()
    _, first = np.unique(view, return_index=True)
    first = np.sort(first)
    if len(first) < n:  # search the distinct codes only, then map back to first members
        di, dj, dd, used = distinct_pairs(codes[first], radius, method, query_batch)
        i, j = first[di], first[dj]
        lo, hi = np.minimum(i, j), np.maximum(i, j)
        return (
            np.concatenate([np.minimum(si, sj), lo]),
            np.concatenate([np.maximum(si, sj), hi]),
            np.concatenate([np.zeros(len(si), np.int64), dd]),
            used,
        )
    return distinct_pairs(codes, radius, method, query_batch)


def distinct_pairs(
    codes: np.ndarray, radius: int, method: Method = "auto", query_batch: int = 65_536
) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """``hamming_pairs`` for codes already known to be distinct: the FAISS range search alone."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, nbytes = codes.shape
    if n < 2:
        empty = np.zeros(0, np.int64)
        return empty, empty, empty, "none"
    used = choose_method(n, method)
    nbits = nbytes * 8
    if used == "flat":
        index = faiss.IndexBinaryFlat(nbits)
    elif used == "multihash":
        nhash, b = multihash_layout(n, nbits)
        index = faiss.IndexBinaryMultiHash(nbits, nhash, b)
        index.nflip = radius // nhash  # exact: see module docstring
        used = f"multihash(nhash={nhash},b={b},nflip={index.nflip})"
    else:
        raise ValueError(f"unknown binary index method {method!r}")
    index.add(codes)
    src, dst, dist = [], [], []
    for start in range(0, n, query_batch):
        q = codes[start : start + query_batch]
        lims, d, ids = index.range_search(q, radius + 1)  # faiss range search is strict (<)
        rows = np.repeat(np.arange(start, start + len(q), dtype=np.int64), np.diff(lims.astype(np.int64)))
        keep = ids > rows  # each unordered pair once, no self pairs
        src.append(rows[keep])
        dst.append(ids[keep].astype(np.int64))
        dist.append(d[keep].astype(np.int64))
    return np.concatenate(src), np.concatenate(dst), np.concatenate(dist), used


def _equal_pairs(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Star edges (first member -- every other member) inside each group of equal codes."""
    view = codes.view(np.dtype((np.void, codes.shape[1]))).ravel()
    _, inverse = np.unique(view, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    groups = inverse[order]
    starts = np.r_[True, groups[1:] != groups[:-1]]
    head = order[starts][np.cumsum(starts) - 1]
    mask = ~starts
    return head[mask].astype(np.int64), order[mask].astype(np.int64)
