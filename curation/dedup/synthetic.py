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
    sizes = rng.integers(2, max_group + 1, size=max(1, int(n * duplicate_fraction)))
    sizes = sizes[np.cumsum(sizes - 1) <= int(n * duplicate_fraction)]
    n_copies = int((sizes - 1).sum())
    n_bases = n - n_copies
    copy_of = np.repeat(np.arange(len(sizes), dtype=np.int64), sizes - 1)
    group = np.concatenate([np.arange(n_bases, dtype=np.int64), copy_of])
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
