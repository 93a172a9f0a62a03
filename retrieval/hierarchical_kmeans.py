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

Checked against the paper's Algorithm 1 and facebookresearch/ssl-data-curation
(``src/hierarchical_kmeans_gpu.py``, ``src/hierarchical_sampling.py``). Where we differ, and why:

* each resampling step restarts k-means from the current centroids; the reference re-runs
  k-means++ from scratch on the resampled points (50 iterations). Warm starts keep a run
  deterministic for a given seed, which exact resume needs, and converge in fewer iterations;
* resampling keeps the points *closest* to each centroid (the reference's default); its
  "random" resampling strategy is not offered;
* distances are cosine on L2-normalised embeddings (spherical k-means, as DINOv2's retrieval
  uses); the reference uses squared L2 in float64;
* the reference skips resampling when a level's sample size is 1 and splits its first level
  into 10M sub-clusters (``n_splits``) for speed; we do neither: level 1 is the pool's clustering
  (``clustering.clusters``, often without resampling, as in DINOv2), upper levels are given as
  ``clustering.hierarchy.levels``;
* balanced sampling never repeats an image (the reference's ``multiplier`` > 1 tiles small
  clusters to oversample them); a curated dataset holds each pool image at most once;
* in the pipeline, the eligible level-1 clusters are those a seed dataset selects (more than
  ``min_seeds`` of its seeds), each can give at most ``per_cluster`` images, and the target size
  is the recipe's ``cap``; the reference samples the whole pool. The quotas are computed from
  cluster counts only (``balanced_quotas``) and the random pick is a hash order of the uids
  (``pick_rank``), so the partitioned stage selects the same images as the single task.
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
    check_levels(ks)
    sizes = [sample_size] * len(ks) if isinstance(sample_size, int) else list(sample_size)
    c, labels, scores = kmeans_with_resampling(
        np.ascontiguousarray(x, np.float32), ks[0], resampling_steps=resampling_steps, sample_size=sizes[0],
        niter=niter, seed=seed, spherical=spherical, gpu=gpu,
    )
    levels = [Level(c, labels)]
    log.info("hierarchical k-means level 1: %d -> %d clusters", len(x), ks[0])
    for centroids, parent in upper_levels(c, ks[1:], resampling_steps=resampling_steps, sample_size=sizes[1:],
                                          niter=niter, seed=seed, spherical=spherical, gpu=gpu):
        levels.append(Level(centroids, parent))
    return HierarchicalKMeans(levels, len(x), scores if spherical else -scores)


def check_levels(ks: Sequence[int]) -> None:
    if not ks or any(b > a for a, b in zip(ks, ks[1:])) or min(ks) < 1:
        raise ValueError(f"ks must be a non-empty, non-increasing list of positive cluster counts, got {list(ks)}")


def upper_levels(
    centroids: np.ndarray,
    ks: Sequence[int],
    *,
    resampling_steps: int,
    sample_size: int | Sequence[int],
    niter: int,
    seed: int,
    spherical: bool = True,
    gpu: str | bool = "auto",
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(centroids, parent) of each level above a clustering: level l+1 clusters the centroids of
    level l. Only centroids are read, so this costs O(C) whatever the size of the pool."""
    sizes = [sample_size] * len(ks) if isinstance(sample_size, int) else list(sample_size)
    out = []
    inputs = np.ascontiguousarray(centroids, np.float32)
    for i, k in enumerate(ks, start=1):
        k = min(int(k), len(inputs))
        c, parent, _ = kmeans_with_resampling(
            inputs, k, resampling_steps=resampling_steps, sample_size=sizes[i - 1], niter=niter,
            seed=seed + 1000 * i, spherical=spherical, gpu=gpu,
        )
        out.append((c, np.asarray(parent, np.int64)))
        log.info("hierarchical k-means level %d: %d -> %d clusters", i + 1, len(inputs), k)
        inputs = c
    return out


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


def balanced_quotas(capacity: np.ndarray, parents: Sequence[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """Level-1 quotas (sum = min(n, capacity.sum())) balanced top-down over a hierarchy.

    ``capacity[c]`` is how many images level-1 cluster c can give (0 for a cluster that is not
    eligible); ``parents[j][c]`` is the level-(j+2) cluster of level-(j+1) cluster c. The quota
    is water-filled over the top clusters, then each cluster's quota over its children, down to
    level 1. Works on cluster counts only, so the pool's rows are never needed in one place.
    """
    caps = [np.asarray(capacity, np.int64)]
    for parent in parents:
        caps.append(np.bincount(parent, weights=caps[-1], minlength=int(parent.max(initial=-1)) + 1).astype(np.int64))
    quota = water_fill(caps[-1], n, rng)
    for level in range(len(parents) - 1, -1, -1):  # split level level+2 quotas over level level+1 children
        parent, child_caps = parents[level], caps[level]
        child_quota = np.zeros(len(parent), np.int64)
        order = np.argsort(parent, kind="stable")
        starts = np.searchsorted(parent[order], np.arange(len(quota) + 1))
        for p in np.flatnonzero(quota):
            kids = order[starts[p]:starts[p + 1]]
            child_quota[kids] = water_fill(child_caps[kids], int(quota[p]), rng)
        quota = child_quota
    return quota


def balanced_sample(
    hkm: HierarchicalKMeans,
    n: int,
    *,
    seed: int = 0,
    strategy: Literal["random", "closest"] = "random",
) -> np.ndarray:
    """Sorted indices of ``n`` data points drawn top-down, balanced over clusters at every level."""
    rng = np.random.default_rng(seed)
    labels1 = hkm.labels(1)
    sizes = np.bincount(labels1, minlength=len(hkm.levels[0].centroids))
    quota = balanced_quotas(sizes, [lv.parent for lv in hkm.levels[1:]], n, rng)
    picked: list[np.ndarray] = []
    for c in np.flatnonzero(quota):
        members = np.flatnonzero(labels1 == c)
        if strategy == "closest":
            order = np.lexsort((members, -hkm.point_scores[members]))
            picked.append(members[order[: quota[c]]])
        else:
            picked.append(rng.choice(members, size=int(quota[c]), replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)


def pick_rank(labels: np.ndarray, uids: np.ndarray, scores: np.ndarray, pick: Literal["random", "closest"], seed: int) -> np.ndarray:
    """Rank of each point inside its cluster for balanced sampling: 0 is taken first.

    ``closest``: highest score (similarity to the centroid) first. ``random``: a fixed random
    order from a hash of (uid, seed), so any partition of the rows ranks them the same way and
    the partitioned and single-task selections agree. Ties go to the smaller uid.
    """
    uids = np.asarray(uids, np.int64)
    if pick == "closest":
        key = -np.asarray(scores, np.float64)
    else:
        key = splitmix64(uids.astype(np.uint64) ^ np.uint64(seed & 0xFFFFFFFFFFFFFFFF))
    order = np.lexsort((uids, key, labels))
    sorted_labels = np.asarray(labels)[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


def splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash of each value (SplitMix64's finaliser)."""
    with np.errstate(over="ignore"):
        z = np.asarray(x, np.uint64) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))
