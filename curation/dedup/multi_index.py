"""Hamming-radius pairs of binary codes, partitioned: multi-index hashing as a shuffle.

Pigeonhole: two codes within Hamming distance r agree exactly on at least one of r + 1 disjoint
substrings. So every code is sent to r + 1 buckets, (substring t, hash of its bits), and
buckets are hashed to partitions; any pair within r shares a bucket and therefore meets in that
bucket's partition. A reduce task then

1. folds identical codes together (a blank image repeated 10^5 times is one code with star
   edges to its members, streamed chunk by chunk, never a 10^10-pair search);
2. searches the partition's distinct codes for pairs within r (FAISS binary range search,
   exact: ``curation.dedup.binary``);
3. keeps a pair only in the partition of its *first* shared bucket, so each pair is emitted by
   exactly one task, and writes the edges, shrunk to a star forest, for connected components.

Memory per reduce task: the distinct codes of its partition and their edges. A bucket is only
as large as the number of codes sharing a substring value; with substrings of ~64 / (r+1) bits
the partitions stay balanced for hash-like codes (radius 6 on 64 bits: 9-10-bit substrings).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from curation import schema
from curation.dedup.binary import hamming_pairs
from curation.partitioned.components import edge_rows, star_forest
from curation.partitioned.files import with_partition
from curation.partitioned.keys import combine, mix64, partition_of

CODE = "code"
_BUCKET_SALT = 0xB0C4E7


def substring_bounds(nbits: int, radius: int) -> list[tuple[int, int]]:
    """r + 1 disjoint bit ranges covering the code (fewer when the code has fewer bits)."""
    m = max(1, min(radius + 1, nbits))
    cuts = np.linspace(0, nbits, m + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:])]


def bucket_keys(codes: np.ndarray, radius: int) -> np.ndarray:
    """uint64 [r + 1, n]: the bucket of every code for every substring (t and its bits hashed)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    n, nbytes = codes.shape
    bits = np.unpackbits(codes, axis=1)
    keys = []
    for t, (a, b) in enumerate(substring_bounds(nbytes * 8, radius)):
        packed = np.packbits(bits[:, a:b], axis=1)
        width = -(-packed.shape[1] // 8) * 8
        words = np.zeros((n, width), np.uint8)
        words[:, : packed.shape[1]] = packed
        words = words.view(np.uint64)
        h = mix64(np.full(n, t + 1, np.int64), _BUCKET_SALT)
        for w in range(words.shape[1]):
            h = combine(h, words[:, w].view(np.int64))
        keys.append(h)
    return np.stack(keys) if keys else np.zeros((0, n), np.uint64)


def bucket_rows(uids: np.ndarray, codes: np.ndarray, radius: int, partitions: int) -> pa.Table:
    """One row (uid, code) per code and substring, keyed by the partition of its bucket."""
    codes = np.ascontiguousarray(codes, np.uint8)
    keys = bucket_keys(codes, radius)
    m, n = keys.shape
    part = partition_of(keys.reshape(-1).view(np.int64), partitions).reshape(m, n)
    idx = np.tile(np.arange(n), m)
    table = pa.table(
        {
            schema.UID: pa.array(np.asarray(uids, np.int64)[idx], pa.int64()),
            CODE: pa.array(list(map(bytes, codes[idx])), pa.binary(codes.shape[1])),
        }
    )
    return with_partition(table, part.reshape(-1))


def _codes_of(table: pa.Table) -> np.ndarray:
    col = table.column(CODE).combine_chunks()
    width = col.type.byte_width
    return np.frombuffer(col.buffers()[1], np.uint8)[col.offset * width : (col.offset + len(col)) * width].reshape(-1, width)


class _DistinctCodes:
    """Distinct codes seen so far with the smallest uid of each, and the star edges that link
    every member to its code's representative, for the codes whose first bucket is ``owned``."""

    def __init__(self, owned):
        self.owned_fn = owned
        self.codes: np.ndarray | None = None
        self.rep = np.zeros(0, np.int64)
        self.owned = np.zeros(0, bool)
        self.a: list[np.ndarray] = []
        self.b: list[np.ndarray] = []

    def add(self, uids: np.ndarray, codes: np.ndarray) -> None:
        if self.codes is None:
            self.codes = np.zeros((0, codes.shape[1]), np.uint8)
        allc = np.concatenate([self.codes, codes])
        view = np.ascontiguousarray(allc).view(np.dtype((np.void, allc.shape[1]))).ravel()
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
        if not self.a:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        a, b = np.concatenate(self.a), np.concatenate(self.b)
        return a[a != b], b[a != b]


def pairs_reduce(part, ctx, radius: int, method: str = "auto") -> dict:
    """Reduce of one bucket partition: edges of every pair within ``radius`` it owns."""
    mine, partitions = ctx.task, ctx.input_partitions

    def first_bucket_here(codes: np.ndarray) -> np.ndarray:
        return partition_of(bucket_keys(codes, radius)[0].view(np.int64), partitions) == mine

    distinct = _DistinctCodes(first_bucket_here)
    rows = 0
    for chunk in part.chunks([schema.UID, CODE]):
        rows += chunk.num_rows
        distinct.add(chunk.column(schema.UID).to_numpy(), _codes_of(chunk))
    if distinct.codes is None:
        return {}
    codes, rep = distinct.codes, distinct.rep
    keys = bucket_keys(codes, radius)
    bucket_p = partition_of(keys.reshape(-1).view(np.int64), partitions).reshape(keys.shape)
    a_same, b_same = distinct.star_edges()
    i, j, _, _ = hamming_pairs(codes, radius, method)
    if len(i):
        equal = keys[:, i] == keys[:, j]  # [m, pairs]: the buckets each pair shares
        first = np.argmax(equal, axis=0)
        owner = bucket_p[first, i]
        keep = (owner == mine) & (rep[i] != rep[j])
        i, j = i[keep], j[keep]
    a = np.concatenate([a_same, rep[i]])
    b = np.concatenate([b_same, rep[j]])
    leaf, root = star_forest(a, b)
    ctx.count("bucket_rows", rows)
    ctx.count("distinct_codes", len(codes))
    ctx.count("pairs", int(len(i)))
    ctx.peak("partition_rows", rows)
    return {"edges": edge_rows(leaf, root, ctx.partitions["edges"])}
