"""Hamming-radius pairs of binary codes, partitioned: multi-index hashing as a shuffle.

Pigeonhole: two codes within Hamming distance r agree exactly on at least one of r + 1 disjoint
substrings. So every code is sent to r + 1 buckets, (substring t, hash of its bits), and
buckets are hashed to partitions; any pair within r shares a bucket and therefore meets in that
bucket's partition. A reduce task then

1. folds identical codes together (a blank image repeated 10^5 times is one code with star
   edges to its members, streamed chunk by chunk, never a 10^10-pair search);
2. verifies, inside each bucket of the partition only, which of its distinct codes lie within r
   (small buckets by vectorised popcount over all their pairs, larger ones by FAISS binary range
   search, exact: ``curation.dedup.binary``). Searching the whole partition instead made every
   code meet every other code of ~1/partitions of the crawl (0.5M codes: 619 task-seconds, now 9);
3. keeps a pair only in its *first* shared bucket, so each pair is emitted by exactly one task,
   and writes the edges, shrunk to a star forest, for connected components.

Memory per reduce task: the distinct codes of its partition and their edges. A bucket is only
as large as the number of codes sharing a substring value; with substrings of ~64 / (r+1) bits
the partitions stay balanced for hash-like codes (radius 6 on 64 bits: 9-10-bit substrings).
Time: a bucket holds ~N / 2^(64/(r+1)) codes (4M codes, radius 6: 7,800), so comparing it all
against all would grow as N^2. Buckets of ``sub_buckets.SPLIT_MIN`` codes or more are split
again on the bits their key leaves free (``curation.dedup.sub_buckets``: r + 1 sub-buckets of
~64 codes per code, one FAISS IVF search per key number of a partition), so each code meets
~max(64, N / 2^16) others per sub-bucket instead of N / 512 (radius 6); smaller ones are
compared whole by FAISS (~0.5 ns a comparison, cheaper below ~2,000 codes). ``buckets: pairs`` keys the buckets on *pairs* of r + 2 substrings instead (two codes
within r agree on at least 2 of them): C(r+2, 2) keys per code (28 at radius 6, 4x the shuffle
rows) of ~2 x 64/(r+2) bits; up to 4M codes that was measured 2.1x slower than single
substrings (``scale_hash_buckets`` JSON, before buckets were split).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from curation import schema
from curation.dedup.band import pair_requests
from curation.dedup.binary import hamming
from curation.dedup import sub_buckets
from curation.partitioned.components import edge_rows, star_forest
from curation.partitioned.files import with_partition
from curation.partitioned.keys import combine, mix64, partition_of

CODE = "code"
_BUCKET_SALT = 0xB0C4E7


# Buckets on pairs of substrings send (r+2)/2 times the rows through the shuffle and divide the
# comparisons inside buckets by ~2^(64/(r+2)) / (r+2). Measured up to 4M codes the single
# substrings still win (their comparisons run in FAISS at ~1 ns; benchmarks/results/
# scale_hash_buckets-*.json), so pairs are an option for crawls far beyond that, not a default.
PAIRS_MAX_RADIUS = 6  # beyond, C(r+2, 2) keys per code cost more shuffle than they could save


@dataclass(frozen=True)
class KeyScheme:
    """The buckets a code is sent to: ``bounds`` are m disjoint bit ranges, and each key is a tuple
    of s of them (s = m - r). Two codes within Hamming distance r differ in at most r of the m
    ranges, so they agree exactly on at least s: they share the bucket of those s ranges."""

    bounds: tuple[tuple[int, int], ...]
    keys: tuple[tuple[int, ...], ...]

    def describe(self) -> str:
        per = len(self.keys[0]) if self.keys else 0
        return f"{len(self.bounds)} substrings, buckets on {per} of them ({len(self.keys)} per code)"


def key_scheme(nbits: int, radius: int, mode: str = "substrings") -> KeyScheme:
    """Single substrings (r + 1 of them: the classic multi-index hashing) or pairs of r + 2
    substrings (radius 1 to 6, codes of at least r + 2 bits; otherwise single substrings)."""
    if mode == "pairs" and 1 <= radius <= PAIRS_MAX_RADIUS and nbits >= radius + 2:
        bounds = _cuts(nbits, radius + 2)
        return KeyScheme(bounds, tuple(itertools.combinations(range(len(bounds)), 2)))
    bounds = _cuts(nbits, max(1, min(radius + 1, nbits)))
    return KeyScheme(bounds, tuple((t,) for t in range(len(bounds))))


def _cuts(nbits: int, m: int) -> tuple[tuple[int, int], ...]:
    cuts = np.linspace(0, nbits, m + 1).round().astype(int)
    return tuple((int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]))


def bucket_keys(codes: np.ndarray, scheme: KeyScheme) -> np.ndarray:
    """uint64 [keys, n]: the bucket of every code for every key (key number and its bits hashed)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    n = codes.shape[0]
    words = _substring_words(codes, scheme.bounds)
    keys = []
    for number, parts in enumerate(scheme.keys):
        h = mix64(np.full(n, number + 1, np.int64), _BUCKET_SALT)
        for t in parts:
            for col in range(words[t].shape[1]):
                h = combine(h, words[t][:, col].view(np.int64))
        keys.append(h)
    return np.stack(keys) if keys else np.zeros((0, n), np.uint64)


def _substring_words(codes: np.ndarray, bounds) -> list[np.ndarray]:
    """Each substring's bits, left-aligned and zero-padded to whole 8-byte words (uint64 [n, words]).
    64-bit codes take shifts and masks on one word instead of unpacking every bit (same words)."""
    n = codes.shape[0]
    if codes.shape[1] == 8:
        word = codes.view(">u8").ravel().astype(np.uint64)
        out = []
        for a, b in bounds:
            high = np.uint64(((1 << (b - a)) - 1) << (64 - (b - a)))
            out.append(((word << np.uint64(a)) & high).byteswap().reshape(n, 1))
        return out
    bits = np.unpackbits(codes, axis=1)
    out = []
    for a, b in bounds:
        packed = np.packbits(bits[:, a:b], axis=1)
        width = -(-packed.shape[1] // 8) * 8
        w = np.zeros((n, width), np.uint8)
        w[:, : packed.shape[1]] = packed
        out.append(w.view(np.uint64))
    return out


def bucket_rows(uids: np.ndarray, codes: np.ndarray, scheme: KeyScheme, partitions: int) -> pa.Table:
    """One row (uid, code) per code and key, keyed by the partition of its bucket."""
    codes = np.ascontiguousarray(codes, np.uint8)
    keys = bucket_keys(codes, scheme)
    m, n = keys.shape
    part = partition_of(keys.reshape(-1).view(np.int64), partitions).reshape(m, n)
    idx = np.tile(np.arange(n), m)
    table = pa.table(
        {
            schema.UID: pa.array(np.asarray(uids, np.int64)[idx], pa.int64()),
            CODE: _fixed_binary(codes[idx]),
        }
    )
    return with_partition(table, part.reshape(-1))


def _fixed_binary(codes: np.ndarray) -> pa.Array:
    """Rows of a uint8 [n, width] array as a fixed-size binary column, without a Python loop."""
    codes = np.ascontiguousarray(codes, np.uint8)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(codes.shape[1]), len(codes), [None, pa.py_buffer(codes.tobytes())])


def _codes_of(table: pa.Table) -> np.ndarray:
    col = table.column(CODE).combine_chunks()
    width = col.type.byte_width
    return np.frombuffer(col.buffers()[1], np.uint8)[col.offset * width : (col.offset + len(col)) * width].reshape(-1, width)


class _DistinctCodes:
    """Distinct codes seen so far with the smallest uid of each, and the star edges that link
    every member to its code's representative, for the codes whose first bucket is ``owned``."""

    FOLD_ROWS = 1 << 16  # rows buffered before a fold, at least (folds also wait for as many rows as are folded)

    def __init__(self, owned):
        self.owned_fn = owned
        self.codes: np.ndarray | None = None
        self.rep = np.zeros(0, np.int64)
        self.owned = np.zeros(0, bool)
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []
        self.pending: list[tuple[np.ndarray, np.ndarray]] = []
        self.pending_rows = 0

    def add(self, uids: np.ndarray, codes: np.ndarray) -> None:
        """Buffer a chunk; fold the buffer in once it holds as many rows as the distinct codes so
        far (and at least ``FOLD_ROWS``), so a partition arriving in many small chunks (one per
        map task) is sorted O(log chunks) times, not once per chunk."""
        self.pending.append((uids, codes))
        self.pending_rows += len(uids)
        if self.pending_rows >= max(self.FOLD_ROWS, 0 if self.codes is None else len(self.codes)):
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        uids = np.concatenate([u for u, _ in self.pending])
        codes = np.concatenate([c for _, c in self.pending])
        self.pending, self.pending_rows = [], 0
        self._fold(uids, codes)

    def _fold(self, uids: np.ndarray, codes: np.ndarray) -> None:
        if self.codes is None:
            self.codes = np.zeros((0, codes.shape[1]), np.uint8)
        allc = np.concatenate([self.codes, codes])
        allc = np.ascontiguousarray(allc)
        view = allc.view(np.uint64 if allc.shape[1] == 8 else np.dtype((np.void, allc.shape[1]))).ravel()  # 64-bit codes sort as integers
        _, first, inv = np.unique(view, return_index=True, return_inverse=True)
        inv = inv.reshape(-1)
        old, new = inv[: len(self.codes)], inv[len(self.codes) :]
        rep = np.full(len(first), np.iinfo(np.int64).max, np.int64)
        rep[old] = self.rep
        np.minimum.at(rep, new, uids)
        owned = np.zeros(len(first), bool)
        owned[old] = self.owned
        fresh = np.ones(len(first), bool)
        fresh[old] = False
        if fresh.any():
            owned[fresh] = self.owned_fn(allc[first][fresh])
        # Members link to their code's representative; a representative that changed links to
        # the new one, so each code's members stay connected whatever the chunk order.
        keep_new, keep_old = owned[new], owned[old]
        self.a += [rep[new][keep_new], rep[old][keep_old]]
        self.b += [uids[keep_new], self.rep[keep_old]]
        self.codes, self.rep, self.owned = allc[first], rep, owned

    def star_edges(self) -> tuple[np.ndarray, np.ndarray]:
        self.flush()
        if not self.a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a, b = np.concatenate(self.a), np.concatenate(self.b)
        return a[a != b], b[a != b]


def pairs_reduce(part, ctx, radius: int, method: str, scheme_of, accept_within: int | None = None) -> dict:
    """Reduce of one bucket partition: edges of every pair within ``radius`` it owns.
    ``scheme_of(nbits)`` gives the map step's key scheme. With ``accept_within`` (a hash band),
    verification requests instead: pairs farther apart than it are to be checked geometrically."""
    mine, partitions = ctx.task, ctx.input_partitions

    def first_bucket_here(codes: np.ndarray) -> np.ndarray:
        scheme = scheme_of(codes.shape[1] * 8)
        first = KeyScheme(scheme.bounds, scheme.keys[:1])  # only the first key decides ownership
        return partition_of(bucket_keys(codes, first)[0].view(np.int64), partitions) == mine

    distinct = _DistinctCodes(first_bucket_here)
    rows = 0
    for chunk in part.chunks([schema.UID, CODE]):
        rows += chunk.num_rows
        distinct.add(chunk.column(schema.UID).to_numpy(), _codes_of(chunk))
    distinct.flush()
    if distinct.codes is None:
        return {}
    codes, rep = distinct.codes, distinct.rep
    keys = bucket_keys(codes, scheme_of(codes.shape[1] * 8))
    here = partition_of(keys.reshape(-1).view(np.int64), partitions).reshape(keys.shape) == mine
    a_same, b_same = distinct.star_edges()
    found: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for i, j, t in _bucket_candidates(codes, keys, here, radius, method, scheme_of(codes.shape[1] * 8)):
        # A pair sharing several buckets is kept only by its first shared one (one task emits it).
        first = np.argmax(keys[:, i] == keys[:, j], axis=0)
        keep = (first == t) & (rep[i] != rep[j])
        distance = hamming(codes[i[keep]], codes[j[keep]]) if accept_within is not None else np.zeros(0, np.int64)
        found.append((rep[i][keep], rep[j][keep], distance))
    pairs = sum(len(x) for x, _, _ in found)
    a = np.concatenate([a_same, *(x for x, _, _ in found)])
    b = np.concatenate([b_same, *(y for _, y, _ in found)])
    ctx.count("bucket_rows", rows)
    ctx.count("distinct_codes", len(codes))
    ctx.count("pairs", int(pairs))
    ctx.peak("partition_rows", rows)
    if accept_within is not None:
        d = np.concatenate([np.zeros(len(a_same), np.int64), *(x for _, _, x in found)])
        return {"requests": pair_requests(np.minimum(a, b), np.maximum(a, b), -d.astype(np.float32), d > accept_within, ctx)}
    leaf, root = star_forest(a, b)
    return {"edges": edge_rows(leaf, root, ctx.partitions["edges"])}


SMALL_BUCKET = 48  # buckets up to this many distinct codes: vectorised all-pairs, no index
PAIR_CHUNK = 1 << 22  # candidate pairs compared at once (bounds the memory of the small path)


def _bucket_candidates(codes: np.ndarray, keys: np.ndarray, here: np.ndarray, radius: int, method: str, scheme: KeyScheme):
    """Yield (i, j, key number) for pairs within ``radius`` inside each bucket of this partition
    (indices into ``codes``, which are distinct): at least every pair whose *first* shared bucket
    it is, which is the only one the caller keeps (others may come too). Only codes sharing a bucket are
    compared: small buckets by all-pairs popcount in bounded chunks, larger ones by FAISS binary
    range search, exact, and buckets of ``SPLIT_MIN`` codes or more (with ``method: auto``) by
    splitting them again on the bits their key leaves free (``curation.dedup.sub_buckets``)."""
    t_of, c_of = np.nonzero(here)
    k = keys[t_of, c_of]
    order = np.lexsort((c_of, t_of, k))
    k, t_of, c_of = k[order], t_of[order], c_of[order]
    starts = np.flatnonzero(np.r_[True, (k[1:] != k[:-1]) | (t_of[1:] != t_of[:-1])])
    sizes = np.diff(np.r_[starts, len(k)])
    small = (sizes >= 2) & (sizes <= SMALL_BUCKET)
    st, sz = starts[small], sizes[small]
    n_pairs = np.cumsum(sz * (sz - 1) // 2)
    lo = 0
    while lo < len(st):
        hi = max(lo + 1, int(np.searchsorted(n_pairs, (n_pairs[lo - 1] if lo else 0) + PAIR_CHUNK, "right")))
        p, q = _all_pairs(st[lo:hi], sz[lo:hi])
        i, j = c_of[p], c_of[q]
        near = hamming(codes[i], codes[j]) <= radius
        yield i[near], j[near], t_of[p][near]
        lo = hi
    split = (sizes >= sub_buckets.SPLIT_MIN) if method == "auto" else np.zeros(len(sizes), bool)
    whole = (sizes > SMALL_BUCKET) & ~split
    bits = np.unpackbits(codes, axis=1) if split.any() else None
    for t in np.unique(t_of[starts[whole | split]]):
        of_t = t_of[starts] == t
        i, j = sub_buckets.compare_whole(codes, _members(c_of, starts, sizes, whole & of_t), radius, method)
        yield i, j, np.full(len(i), t)
        if bits is not None:
            free = _free_bits(scheme, int(t), bits.shape[1])
            i, j = sub_buckets.pairs_in_large_buckets(
                codes, bits, _members(c_of, starts, sizes, split & of_t), free, radius, ranges=_split_ranges(scheme, int(t), radius)
            )
            yield i, j, np.full(len(i), t)


def _split_ranges(scheme: KeyScheme, key_number: int, radius: int):
    """How a large bucket of this key is split: single substrings keep a pair only in its first
    shared bucket, which leaves fewer ranges to search (``sub_buckets.first_bucket_ranges``);
    pairs of substrings use r + 1 ranges of the free bits (the default)."""
    if all(parts == (t,) for t, parts in enumerate(scheme.keys)):
        return sub_buckets.first_bucket_ranges(scheme.bounds, key_number, radius)
    return None


def _members(c_of: np.ndarray, starts: np.ndarray, sizes: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    """The codes of each selected bucket (runs ``[start, start + size)`` of ``c_of``)."""
    return [c_of[s0 : s0 + n] for s0, n in zip(starts[mask], sizes[mask])]


def _free_bits(scheme: KeyScheme, key_number: int, nbits: int) -> np.ndarray:
    """Bit positions a bucket of this key does not fix (outside the substrings of its key)."""
    fixed = np.zeros(nbits, bool)
    for part in scheme.keys[key_number]:
        a, b = scheme.bounds[part]
        fixed[a:b] = True
    return np.flatnonzero(~fixed)


def _all_pairs(starts: np.ndarray, sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (p, q), p < q, of every pair inside each run ``[start, start + size)``."""
    total = int(sizes.sum())
    offset = np.arange(total) - np.repeat(np.cumsum(sizes) - sizes, sizes)
    pos = np.repeat(starts, sizes) + offset
    count = np.repeat(sizes, sizes) - 1 - offset
    rows_ = np.repeat(pos, count)
    step = np.arange(int(count.sum())) - np.repeat(np.cumsum(count) - count, count)
    return rows_, rows_ + 1 + step
