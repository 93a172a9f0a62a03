"""Pairs within a Hamming radius inside large buckets, by splitting them again (exact).

A multi-index bucket holds the codes that agree on one substring, about N / 2^b of them (b ~ 64 /
(r + 1) bits: 9 at radius 6). Comparing a bucket's codes all against all therefore costs
N^2 / 2^2b per bucket, the one term of the hash stages that grows faster than N log N (4M codes:
7,800 per bucket, 80% of the reduce time). Inside a bucket the pigeonhole applies again: two of
its codes within r of each other differ in at most r of the bits the bucket leaves *free*, so
they agree exactly on at least one of any r + 1 disjoint ranges of those bits. Each code of a
large bucket therefore goes to r + 1 sub-buckets (range u, its value there), chosen ~64 codes
wide, and only codes sharing a sub-bucket are compared:

* every sub-bucket of the large buckets of one key number in a task is searched at once by one
  FAISS binary IVF index whose lists *are* the sub-buckets (``add_core`` / ``range_search_preassigned``: each code
  is assigned to its own sub-bucket, scanned in C++, never a Python loop per sub-bucket);
* a sub-bucket that is itself large is split the same way on the bits left free, once more at
  most (each level sends a code to r + 1 places) and only if the split shrank it to half its
  bucket or less; otherwise (codes that agree on most bits: near-blank images) it is compared
  whole, as an unsplit bucket would be;
* a pair agreeing on several ranges is kept only in its first one, so each pair is found once;
* multi-index hashing on single substrings keeps a pair only in its *first* shared bucket,
  which leaves fewer ranges to search in the later buckets (``first_bucket_ranges``: r - t + 1
  ranges of the bits after substring t, and in the last bucket the combinations of halves of
  the earlier substrings); pairs of substrings split on r + 1 ranges of all their free bits.

Cost per bucket membership at radius 6 on 2 CPUs (4M codes): 7 down to 2 IVF queries (31 per
code over its 7 buckets, 49 with r + 1 ranges everywhere), each scanning a sub-bucket of ~64 to
~500 codes. The candidate search of a reduce of ~270k bucket rows of random codes took ~0.22 s,
against ~0.26 s with r + 1 ranges everywhere and ~0.8 s comparing its buckets whole. With ranges of at
most 7 bits at radius 6, sub-buckets hold ~N / 2^16 codes once N passes ~4M: the comparisons
still grow as N^2, ~18x below the unsplit buckets', and the per-query overhead dominates up to
~8M codes; at ~130M codes the sub-buckets reach ``SPLIT_MIN`` and are split once more
(``MAX_DEPTH``). Memory: the task's distinct codes, unpacked to bits once (a byte per bit),
plus a sub-bucket entry per code and range of the split buckets.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import faiss
import numpy as np

from curation.dedup.binary import distinct_pairs

SPLIT_MIN = 2048  # distinct codes in a bucket from which sub-buckets beat one flat search (measured)
SUB_BUCKET_TARGET = 64  # codes per sub-bucket the split aims for (FAISS scans ~60-ns per query)
MAX_DEPTH = 2  # levels of splitting: each sends every code to r + 1 sub-buckets


def pairs_in_large_buckets(
    codes: np.ndarray,
    bits: np.ndarray,
    buckets: list[np.ndarray],
    free: np.ndarray,
    radius: int,
    depth: int = 1,
    ranges: Ranges | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Pairs (i, j), i != j indices into ``codes``, within ``radius`` inside each of ``buckets``
    (arrays of indices of distinct codes). The codes of a bucket are expected to agree on every
    bit outside ``free`` (bit positions into ``bits``, the unpacked codes); if they do not (a
    hash collision of bucket keys), their distance on the free bits is still at most the full
    distance, so no pair is missed. Each pair is returned once per bucket.

    ``ranges(width)`` gives bit ranges of about ``width`` bits such that every wanted pair
    agrees exactly on at least one of them; by default r + 1 equal ranges of the free bits (pigeonhole). A
    caller that knows more about the pairs it keeps passes fewer (``first_bucket_ranges``)."""
    empty = np.zeros(0, np.int64)
    buckets = [b for b in buckets if len(b) >= 2]
    if not buckets:
        return empty, empty
    want = _wanted_width(max(len(b) for b in buckets))
    cut = (ranges or (lambda width: equal_ranges(free, radius + 1, width)))(want)
    if not cut or depth > MAX_DEPTH:  # no bits left to split on, or deep enough: compare whole
        return compare_whole(codes, buckets, radius)
    w = max(len(p) for p in cut)
    sizes_in = np.array([len(b) for b in buckets])
    members = np.concatenate(buckets)
    bucket_of = np.repeat(np.arange(len(buckets), dtype=np.int64), sizes_in)
    words = codes.view(">u8").ravel() if codes.shape[1] == 8 else None
    values = _values(bits, members, cut, words)
    # Every (range, bucket, value) is one sub-bucket; all of them are sorted and searched at once.
    span = int(len(buckets)) << w
    key = (np.arange(len(cut), dtype=np.int64)[:, None] * span + ((bucket_of << w)[None, :] | values.T)).ravel()
    idx = np.tile(members, len(cut))
    order = np.argsort(key)
    key, idx = key[order], idx[order]
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    sizes = np.diff(np.r_[starts, len(key)])
    range_of, parent = key[starts] // span, sizes_in[(key[starts] % span) >> w]
    large = sizes >= SPLIT_MIN
    shrunk = large & (2 * sizes <= parent)
    small = np.repeat((sizes >= 2) & ~large, sizes)
    i, j, list_key = _lists_search(codes, idx[small], key[small], radius)
    found = [(i, j, list_key // span)]
    for u in np.unique(range_of[large]):
        here = range_of == u
        deeper = [idx[s : s + n] for s, n in zip(starts[here & shrunk], sizes[here & shrunk])]
        rest = np.setdiff1d(free, cut[u], assume_unique=True)
        whole = [idx[s : s + n] for s, n in zip(starts[here & large & ~shrunk], sizes[here & large & ~shrunk])]
        for i, j in (pairs_in_large_buckets(codes, bits, deeper, rest, radius, depth + 1), compare_whole(codes, whole, radius)):
            found.append((i, j, np.full(len(i), u)))
    i, j, u = (np.concatenate(x) for x in zip(*found))
    keep = _first_agreeing(bits, i, j, cut) == u  # a pair agreeing on several ranges: its first only
    return i[keep], j[keep]


Ranges = Callable[[int], list[np.ndarray]]


def equal_ranges(positions: np.ndarray, count: int, want: int) -> list[np.ndarray]:
    """``count`` disjoint runs of ``positions``, each of ``want`` bits or as many as they allow
    (none if that is zero)."""
    w = min(want, len(positions) // count)
    return [positions[u * w : (u + 1) * w] for u in range(count)] if w > 0 else []


def first_bucket_ranges(bounds: tuple[tuple[int, int], ...], t: int, radius: int) -> Ranges:
    """The ranges for bucket ``t`` of single-substring multi-index hashing (``bounds``, r + 1
    substrings), when that bucket keeps only the pairs whose *first* equal substring is t.

    Such a pair differs on each of substrings 0 .. t-1, so at most r - t of its differences lie
    in substrings t+1 .. r: r - t + 1 ranges of those bits suffice (7 at t = 0 down to 2, not
    r + 1 each: radius 6 sends a code to 31 sub-buckets over its 7 buckets instead of 49). In the
    last bucket (t = r) there are no later bits, but each earlier substring differs in exactly
    one bit, so exactly one of its two halves agrees: the ranges are the 2^k combinations of the
    halves of k earlier substrings, k just enough for ``width`` bits."""
    later = np.arange(bounds[t + 1][0], bounds[-1][1]) if t + 1 < len(bounds) else np.zeros(0, np.int64)
    if len(later):
        return lambda width: equal_ranges(later, radius - t + 1, width)
    if t == 0 or t != radius:  # fewer substrings than r + 1 (codes shorter than r + 1 bits)
        return lambda width: []
    halves = [np.array_split(np.arange(a, b), 2) for a, b in bounds[:t]]

    def combinations(width: int) -> list[np.ndarray]:
        k = 1
        while k < t and sum(len(h[1]) for h in halves[:k]) < width:
            k += 1
        return [np.concatenate(c) for c in itertools.product(*halves[:k])]

    return combinations


def _wanted_width(largest: int) -> int:
    """Bits per range for sub-buckets of ~``SUB_BUCKET_TARGET`` codes."""
    return max(1, math.ceil(math.log2(max(2, largest) / SUB_BUCKET_TARGET)))


def _values(bits: np.ndarray, rows: np.ndarray, ranges: list[np.ndarray], words: np.ndarray | None = None) -> np.ndarray:
    """int64 [rows, ranges]: for each range (bit positions), an integer that is equal for two
    rows exactly when their codes agree on that range. ``words``: the codes as big-endian uint64
    (64-bit codes), read with shifts; otherwise a gather of the unpacked bits (the two number
    the bits differently; one call uses one of them)."""
    out = np.zeros((len(rows), len(ranges)), np.int64)
    x = words[rows] if words is not None else bits[rows]
    for u, positions in enumerate(ranges):
        if words is not None:
            for offset, (start, n) in _runs(positions):
                part = (x >> np.uint64(64 - start - n)) & np.uint64((1 << n) - 1)
                out[:, u] |= part.astype(np.int64) << offset
        else:
            packed = np.packbits(x[:, positions], axis=1, bitorder="little").astype(np.int64)
            out[:, u] = (packed << (8 * np.arange(packed.shape[1], dtype=np.int64))).sum(axis=1)
    return out


def _runs(positions: np.ndarray):
    """(bit offset in the value, (first position, length)) of each run of consecutive positions."""
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    offset = 0
    for run in np.split(positions, breaks):
        yield offset, (int(run[0]), len(run))
        offset += len(run)


def _first_agreeing(bits: np.ndarray, i: np.ndarray, j: np.ndarray, ranges: list[np.ndarray]) -> np.ndarray:
    """For each pair, the first range on which both codes agree exactly."""
    if len(i) == 0:
        return np.zeros(0, np.int64)
    agree = np.stack([(bits[i][:, p] == bits[j][:, p]).all(axis=1) for p in ranges])
    return np.argmax(agree, axis=0)


def _lists_search(codes: np.ndarray, rows: np.ndarray, key: np.ndarray, radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs (i, j, their key) within ``radius`` among rows sharing a key (rows sorted by key):
    one binary IVF index whose inverted lists are the keys, each row preassigned to its own list
    and searched only there."""
    empty = np.zeros(0, np.int64)
    if len(rows) < 2:
        return empty, empty, empty
    lists = np.cumsum(np.r_[False, key[1:] != key[:-1]]).astype(np.int64)  # rows are sorted by key
    nlist = int(lists[-1]) + 1
    x = np.ascontiguousarray(codes[rows], np.uint8)
    nbits = x.shape[1] * 8
    quantizer = faiss.IndexBinaryFlat(nbits)  # never searched: every row's list is given
    quantizer.add(np.zeros((nlist, x.shape[1]), np.uint8))
    index = faiss.IndexBinaryIVF(quantizer, nbits, nlist)
    index.is_trained, index.nprobe = True, 1
    ids = np.arange(len(rows), dtype=np.int64)
    index.add_core(len(rows), faiss.swig_ptr(x), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    lims, _, found = index.range_search_preassigned(x, radius + 1, lists[:, None], None)  # strict <
    q = np.repeat(ids, np.diff(lims.astype(np.int64)))
    keep = found > q
    return rows[q[keep]], rows[found[keep]], key[q[keep]]


def compare_whole(codes: np.ndarray, buckets: list[np.ndarray], radius: int, method: str = "flat") -> tuple[np.ndarray, np.ndarray]:
    """Pairs within ``radius`` inside each bucket, each compared all against all (``distinct_pairs``)."""
    out_i, out_j = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for b in buckets:
        i, j, _, _ = distinct_pairs(codes[b], radius, method)
        out_i.append(b[i])
        out_j.append(b[j])
    return np.concatenate(out_i), np.concatenate(out_j)

