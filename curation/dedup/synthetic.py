"""Synthetic descriptors with planted duplicate groups, for tests and the scale benchmark.

Distinct images are random unit vectors around a few broad "topic" centres (so an IVF index
sees cluster structure; two images of one topic have cosine ~0.2, unrelated ones ~0); a
duplicate group is a base vector plus copies perturbed by independent noise (cosine ~0.93 to the
base, ~0.86 between copies at the default noise), well above the 0.6 edge threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Planted:
    x: np.ndarray  # float32 [n, dim], L2-normalised
    group: np.ndarray  # int64 [n]: rows sharing a value are planted copies of one image

    def true_pairs(self) -> set[tuple[int, int]]:
        """All unordered pairs of rows planted in the same group (small n only)."""
        order = np.argsort(self.group, kind="stable")
        g = self.group[order]
        bounds = np.flatnonzero(np.r_[True, g[1:] != g[:-1], True])
        pairs: set[tuple[int, int]] = set()
        for a, b in zip(bounds[:-1], bounds[1:]):
            members = order[a:b]
            pairs.update((int(min(i, j)), int(max(i, j))) for i in members for j in members if i != j)
        return pairs


def _bases_then_copies(rng, n: int, fraction: float, max_group: int) -> np.ndarray:
    """Group ids: about ``fraction`` of ``n`` rows are extra members of groups of 2..max_group.
    Rows 0..B-1 are the bases (group i = i), the copies follow (group = their base)."""
    sizes = rng.integers(2, max_group + 1, size=max(1, int(n * fraction)))
    sizes = sizes[np.cumsum(sizes - 1) <= int(n * fraction)]
    extra = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes - 1)
    return np.concatenate([np.arange(n - len(extra), dtype=np.int64), extra])


def planted_groups(
    n: int,
    dim: int,
    duplicate_fraction: float = 0.2,
    max_group: int = 5,
    copy_noise: float = 0.4,
    topics: int = 64,
    topic_spread: float = 0.5,
    seed: int = 0,
    chunk: int = 262_144,
) -> Planted:
    """``n`` descriptors of which about ``duplicate_fraction`` are extra copies, in groups of
    2..``max_group`` members. Rows are shuffled so groups are not contiguous."""
    rng = np.random.default_rng(seed)
    group = _bases_then_copies(rng, n, duplicate_fraction, max_group)
    n_bases = int(np.sum(group == np.arange(n)))
    centres = rng.standard_normal((topics, dim)).astype(np.float32) * (topic_spread / np.sqrt(dim))
    topic = rng.integers(0, topics, n_bases)
    x = np.empty((n, dim), np.float32)
    for start in range(0, n, chunk):  # chunked so temporaries stay small at N = 10M
        stop = min(n, start + chunk)
        noise = rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        rows = np.arange(start, stop)
        bases = rows < n_bases
        if bases.any():
            b = rows[bases]
            x[b] = centres[topic[b]] + noise[bases]
            x[b] /= np.linalg.norm(x[b], axis=1, keepdims=True)
        if (~bases).any():
            c = rows[~bases]
            x[c] = x[group[c]] + copy_noise * noise[~bases]  # bases come first, so are ready
            x[c] /= np.linalg.norm(x[c], axis=1, keepdims=True)
    perm = rng.permutation(n)
    return Planted(x[perm], group[perm])


@dataclass
class ScaleData:
    """Synthetic crawl rows for the scale benchmark, with every planted duplicate known.

    x: float16 [n, dim] L2-normalised copy-detection descriptors. Bases have semantic
      structure (a coarse topic, a fine topic, noise: cosine ~0.4 within a fine topic, ~0.3
      within a coarse one, ~0 otherwise), so their nearest neighbours are meaningful and an IVF
      index can find them; planted copies sit at cosine ~0.92-0.96 to their base ("copy"
      groups) or ~0.99999 ("re-encode" groups, the near-exact duplicates a PCA-hash catches).
    copy_group: int64 [n]; rows sharing a value are copies of one image (either kind).
    reencode: bool [n]; the row is in a re-encode group.
    phash: uint64 [n], with hash_group: int64 [n] (planted hashes within 1-3 bits).
    ids: int64 [n] content keys, with exact duplicates (id_group: rows sharing an id).
    """

    x: np.ndarray
    copy_group: np.ndarray
    reencode: np.ndarray
    phash: np.ndarray
    hash_group: np.ndarray
    ids: np.ndarray


def _grouped(rng, n: int, fraction: float, max_group: int) -> np.ndarray:
    """Group ids in shuffled row order (see ``_bases_then_copies``)."""
    return _bases_then_copies(rng, n, fraction, max_group)[rng.permutation(n)]


def scale_dataset(
    n: int,
    dim: int = 256,
    seed: int = 0,
    coarse_topics: int = 64,
    fine_size: int = 256,
    copy_fraction: float = 0.1,
    reencode_fraction: float = 0.02,
    hash_fraction: float = 0.05,
    id_fraction: float = 0.03,
    max_group: int = 4,
    coarse_weight: float = 0.3,
    fine_weight: float = 0.1,
    copy_noise: float = 0.3,
    reencode_noise: float = 0.005,
    chunk: int = 262_144,
) -> ScaleData:
    rng = np.random.default_rng(seed)
    copy_group = _grouped(rng, n, copy_fraction + reencode_fraction, max_group)
    n_groups = int(copy_group.max()) + 1
    is_reencode_group = rng.random(n_groups) < reencode_fraction / (copy_fraction + reencode_fraction)
    # The first row of each group (in row order) is the base; the others are its copies.
    _, base_row = np.unique(copy_group, return_index=True)
    is_base = np.zeros(n, bool)
    is_base[base_row] = True
    coarse = rng.standard_normal((coarse_topics, dim)).astype(np.float32)
    coarse /= np.linalg.norm(coarse, axis=1, keepdims=True)
    n_fine = max(1, n // fine_size)
    fine_parent = rng.integers(0, coarse_topics, n_fine)
    noise_weight = np.sqrt(max(1e-6, 1 - coarse_weight - fine_weight))
    fine_rng = np.random.default_rng(seed + 1)
    fine = fine_rng.standard_normal((n_fine, dim)).astype(np.float32)
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    topic = rng.integers(0, n_fine, n_groups)
    base_x = np.empty((n_groups, dim), np.float32)
    for start in range(0, n_groups, chunk):
        stop = min(n_groups, start + chunk)
        t = topic[start:stop]
        v = np.sqrt(coarse_weight) * coarse[fine_parent[t]] + np.sqrt(fine_weight) * fine[t]
        v += noise_weight * rng.standard_normal((stop - start, dim)).astype(np.float32) / np.sqrt(dim)
        base_x[start:stop] = v / np.linalg.norm(v, axis=1, keepdims=True)
    x = np.empty((n, dim), np.float16)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        g = copy_group[start:stop]
        v = base_x[g].copy()
        copies = ~is_base[start:stop]
        noise = np.where(is_reencode_group[g], reencode_noise, copy_noise)[copies, None]
        v[copies] += noise * rng.standard_normal((int(copies.sum()), dim)).astype(np.float32) / np.sqrt(dim)
        x[start:stop] = (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float16)
    hash_group = _grouped(rng, n, hash_fraction, max_group)
    hash_base = rng.integers(0, 2**63, int(hash_group.max()) + 1, dtype=np.int64).view(np.uint64)
    hash_base |= rng.integers(0, 2, len(hash_base)).astype(np.uint64) << np.uint64(63)
    phash = hash_base[hash_group]
    _, first = np.unique(hash_group, return_index=True)
    flips = np.ones(n, bool)
    flips[first] = False
    bits = np.zeros(n, np.uint64)
    for _ in range(3):  # 1-3 random bit flips per copy
        on = flips & (rng.random(n) < 0.7)
        bits[on] |= np.uint64(1) << rng.integers(0, 64, int(on.sum())).astype(np.uint64)
    bits[flips & (bits == 0)] = np.uint64(1)
    phash = phash ^ bits
    id_group = _grouped(rng, n, id_fraction, max_group)
    ids = rng.integers(-(2**62), 2**62, int(id_group.max()) + 1)[id_group]
    return ScaleData(x, copy_group, is_reencode_group[copy_group], phash, hash_group, ids)
