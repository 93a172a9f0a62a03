"""Hierarchical k-means with resampling and balanced top-down sampling (Vo et al. 2024).

Our implementation of the method described in "Automatic Data Curation for Self-Supervised
Learning: A Clustering-Based Approach" (Vo et al. 2024):

* **Levels.** Level 1 clusters the data into ``ks[0]`` clusters; level ``l`` clusters the
  centroids of level ``l-1`` into ``ks[l-1]`` clusters. Higher levels describe coarser concepts.
* **Resampling.** Plain k-means puts many centroids in dense regions (web crawls are dominated by
  a few concepts). After k-means at a level, each resampling step keeps only the ``sample_size``
  points closest to each centroid and re-runs k-means on that union, starting from the current
  centroids; every cluster then weighs the same in the update, and centroids spread over the
  support of the data instead of following its density.
* **Balanced sampling.** To draw ``n`` points, the quota is split evenly across the top-level
  clusters; a cluster with fewer points than its share gives it all and the rest is shared by
  the others (water-filling). Each cluster's quota is split the same way across its children,
  down to level 1, where points are picked at random (or closest to the centroid first).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from retrieval.kmeans import assign, kmeans

log = logging.getLogger(__name__)


@dataclass
class Level:
    centroids: np.ndarray  # float32 [k, d]
    parent: np.ndarray  # int64 [size of the level below]: cluster of each element below


@dataclass
class HierarchicalKMeans:
    levels: list[Level]
    n_points: int
    # Similarity (or -distance) of each data point to its level-1 centroid: the "closest" order.
    point_scores: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, np.float32))

    def labels(self, level: int = 1) -> np.ndarray:
        """Cluster at ``level`` (1-based) of every data point."""
        lab = self.levels[0].parent
        for lv in self.levels[1:level]:
            lab = lv.parent[lab]
        return lab

    def cluster_sizes(self, level: int) -> np.ndarray:
        return np.bincount(self.labels(level), minlength=len(self.levels[level - 1].centroids))


def kmeans_with_resampling(
    x: np.ndarray,
    k: int,
    *,
    resampling_steps: int,
    sample_size: int,
    niter: int,
    seed: int,
    spherical: bool,
    gpu: str | bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(centroids, labels, scores) of ``x`` after k-means and ``resampling_steps`` resamplings."""
    res = kmeans(x, k, niter=niter, seed=seed, spherical=spherical, gpu=gpu)
    centroids, labels, scores = res.centroids, res.labels, res.scores
    for step in range(resampling_steps):
        keep = closest_per_cluster(labels, scores, sample_size, higher_is_closer=spherical)
        if len(keep) < k:
            break  # fewer resampled points than clusters: nothing more to balance
        centroids = kmeans(x[keep], k, niter=niter, seed=seed + step + 1, spherical=spherical, gpu=gpu, init_centroids=centroids).centroids
        labels, scores = assign(x, centroids, spherical, gpu)
    return centroids, labels, scores


def closest_per_cluster(labels: np.ndarray, scores: np.ndarray, m: int, higher_is_closer: bool = True) -> np.ndarray:
    """Indices of the ``m`` points of each cluster closest to its centroid (ties by index)."""
    key = -scores if higher_is_closer else scores
    order = np.lexsort((np.arange(len(labels)), key, labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < m])


def hierarchical_kmeans(
    x: np.ndarray,
    ks: Sequence[int],
    *,
    resampling_steps: int = 10,
    sample_size: int | Sequence[int] = 10,
    niter: int = 20,
    seed: int = 0,
    spherical: bool = True,
    gpu: str | bool = "auto",
) -> HierarchicalKMeans:
    """Fit levels with ``ks`` clusters from fine to coarse (``ks`` must not increase)."""
    if not ks or any(b > a for a, b in zip(ks, ks[1:])):
        raise ValueError(f"ks must be a non-empty, non-increasing list of cluster counts, got {list(ks)}")
    sizes = [sample_size] * len(ks) if isinstance(sample_size, int) else list(sample_size)
    levels: list[Level] = []
    inputs = np.ascontiguousarray(x, np.float32)
    point_scores = np.zeros(len(x), np.float32)
    for i, k in enumerate(ks):
        c, labels, scores = kmeans_with_resampling(
            inputs, k, resampling_steps=resampling_steps, sample_size=sizes[i], niter=niter, seed=seed + 1000 * i, spherical=spherical, gpu=gpu
        )
        if i == 0:
            point_scores = scores if spherical else -scores
        levels.append(Level(c, labels))
        log.info("hierarchical k-means level %d: %d -> %d clusters", i + 1, len(inputs), k)
        inputs = c
    return HierarchicalKMeans(levels, len(x), point_scores)


def water_fill(sizes: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Split ``n`` over groups as evenly as their ``sizes`` allow (sum = min(n, sizes.sum())).

    Groups smaller than the even share give all they have; the remainder of an uneven split
    goes to randomly chosen groups so no group is systematically favoured.
    """
    sizes = np.asarray(sizes, dtype=np.int64)
    alloc = np.zeros_like(sizes)
    n = int(min(n, sizes.sum()))
    open_ = np.flatnonzero(sizes > 0)
    while n > 0 and len(open_):
        share = n // len(open_)
        room = sizes[open_] - alloc[open_]
        if share == 0:
            lucky = rng.choice(open_, size=n, replace=False)
            alloc[lucky] += 1
            break
        give = np.minimum(room, share)
        alloc[open_] += give
        n -= int(give.sum())
        open_ = open_[sizes[open_] > alloc[open_]]
    return alloc


def balanced_sample(
    hkm: HierarchicalKMeans,
    n: int,
    *,
    seed: int = 0,
    strategy: Literal["random", "closest"] = "random",
) -> np.ndarray:
    """Sorted indices of ``n`` data points drawn top-down, balanced over clusters at every level."""
    rng = np.random.default_rng(seed)
    depth = len(hkm.levels)
    point_labels = [hkm.labels(lv) for lv in range(1, depth + 1)]
    # quota[c] for the clusters of the current level, starting at the top.
    top_sizes = np.bincount(point_labels[-1], minlength=len(hkm.levels[-1].centroids))
    quota = water_fill(top_sizes, n, rng)
    for lv in range(depth - 1, 0, -1):  # split each level-(lv+1) quota over its level-lv children
        child_parent = hkm.levels[lv].parent  # parent (at level lv+1) of each level-lv cluster
        child_sizes = np.bincount(point_labels[lv - 1], minlength=len(child_parent))
        child_quota = np.zeros(len(child_parent), np.int64)
        for parent in np.flatnonzero(quota):
            kids = np.flatnonzero(child_parent == parent)
            child_quota[kids] = water_fill(child_sizes[kids], int(quota[parent]), rng)
        quota = child_quota
    picked: list[np.ndarray] = []
    labels1 = point_labels[0]
    for c in np.flatnonzero(quota):
        members = np.flatnonzero(labels1 == c)
        if strategy == "closest":
            order = np.lexsort((members, -hkm.point_scores[members]))
            picked.append(members[order[: quota[c]]])
        else:
            picked.append(rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
