"""Cluster-based retrieval (DINOv2, Table 15): whole k-means clusters of the pool near a seed set.

The pool is clustered once (k-means, C clusters); seed images are assigned to the nearest
centroid; every cluster holding more than ``min_seeds`` images of a seed dataset contributes up
to ``per_cluster`` pool images, closest to the centroid first, and the seed dataset is capped at
``cap`` images. When the cap cuts, clusters are served round-robin by rank (each cluster's
closest image, then each cluster's second closest, ...), most-seeded clusters first within a
round, so the cap keeps every selected concept rather than the first few clusters.

Small pools: the paper's C = 100,000 and per_cluster = 10,000 assume ~744M pool images (7,440
per cluster on average; per_cluster is 1.34x that). ``scaled_cluster_params`` keeps those
ratios for small pools (see its docstring); the runner logs the values it used.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

PAPER_POOL_SIZE = 744_000_000
PAPER_CLUSTERS = 100_000
PAPER_PER_CLUSTER = 10_000
# per_cluster relative to the mean cluster size in the paper: 10,000 / 7,440 = 1.344.
PAPER_TAKE_RATIO = PAPER_PER_CLUSTER / (PAPER_POOL_SIZE / PAPER_CLUSTERS)


@dataclass(frozen=True)
class ClusterParams:
    clusters: int
    per_cluster: int
    rule: str


def scaled_clusters(n_pool: int, clusters: int = PAPER_CLUSTERS, points_per_cluster: int = 100) -> int:
    """C = min(clusters, max(2, round(N / points_per_cluster))), never more than N.

    At paper scale this is the configured C; a small pool gets clusters of about
    ``points_per_cluster`` images (a crawl of 3,000 images -> 30 clusters) instead of clusters
    of one image, which would make "more than 3 seeds per cluster" meaningless.
    """
    return max(1, min(n_pool, clusters, max(2, round(n_pool / points_per_cluster))))


def scaled_per_cluster(n_pool: int, n_clusters: int, per_cluster: int, clusters_configured: int) -> int:
    """per_cluster as configured when C is as configured; otherwise scaled with the mean cluster
    size: min(per_cluster, ceil(1.344 * N / C)), the paper's per_cluster / mean-size ratio."""
    if n_clusters >= clusters_configured:
        return per_cluster
    return max(1, min(per_cluster, math.ceil(PAPER_TAKE_RATIO * n_pool / max(1, n_clusters))))


def cluster_params(n_pool: int, per_cluster: int, clusters: int = PAPER_CLUSTERS, points_per_cluster: int = 100) -> ClusterParams:
    c = scaled_clusters(n_pool, clusters, points_per_cluster)
    pc_ = scaled_per_cluster(n_pool, c, per_cluster, clusters)
    if c == clusters and pc_ == per_cluster:
        rule = f"paper values: C={c}, per_cluster={pc_}"
    else:
        rule = (
            f"pool of {n_pool} images: C = min({clusters}, max(2, round(N/{points_per_cluster}))) = {c}; "
            f"per_cluster = min({per_cluster}, ceil({PAPER_TAKE_RATIO:.3f} * N/C)) = {pc_}"
        )
    return ClusterParams(c, pc_, rule)


@dataclass
class ClusterRetrieval:
    pool_idx: np.ndarray  # int64 [m], sorted
    cluster: np.ndarray  # int64 [m]: cluster of each retrieved image
    selected_clusters: np.ndarray  # int64: clusters with more than min_seeds seeds
    seeds_per_cluster: np.ndarray  # int64 [C]: seeds of this dataset in each cluster
    capped: bool


def rank_in_cluster(labels: np.ndarray, closeness: np.ndarray) -> np.ndarray:
    """0 for the point closest to its centroid, 1 for the next, ... (ties by index)."""
    order = np.lexsort((np.arange(len(labels)), -closeness, labels))
    sorted_labels = labels[order]
    first = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.empty(len(labels), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


def cluster_retrieval(
    pool_labels: np.ndarray,
    pool_closeness: np.ndarray,
    seed_labels: np.ndarray,
    n_clusters: int,
    *,
    min_seeds: int,
    per_cluster: int,
    cap: int,
) -> ClusterRetrieval:
    """Pool images of the clusters that hold more than ``min_seeds`` seeds.

    ``pool_closeness`` is higher for points nearer their centroid (cosine similarity).
    """
    pool_labels = np.asarray(pool_labels, np.int64)
    seeds_per_cluster = np.bincount(np.asarray(seed_labels, np.int64), minlength=n_clusters)
    selected = np.flatnonzero(seeds_per_cluster > min_seeds)
    rank = rank_in_cluster(pool_labels, np.asarray(pool_closeness, np.float32))
    candidate = np.flatnonzero(np.isin(pool_labels, selected) & (rank < per_cluster))
    capped = len(candidate) > cap
    if capped:
        c = pool_labels[candidate]
        order = np.lexsort((c, -seeds_per_cluster[c], rank[candidate]))
        candidate = np.sort(candidate[order[:cap]])
    return ClusterRetrieval(candidate.astype(np.int64), pool_labels[candidate], selected.astype(np.int64), seeds_per_cluster, capped)


# -- hierarchical balanced sampling (Vo et al. 2024) over the clusters a seed dataset selects --
def hierarchy_levels(n_clusters: int, clusters_configured: int, levels: list[int]) -> list[int]:
    """Cluster counts of the upper levels for a pool clustered into ``n_clusters``.

    At the configured C the levels are as configured; a small pool's C scales them by the same
    factor (at least 2 clusters while the level below has more). A level that would not merge
    anything (as many clusters as the level below) is left out.
    """
    scale = min(1.0, n_clusters / max(1, clusters_configured))
    out, below = [], n_clusters
    for k in levels:
        k = min(below, max(min(2, below), round(k * scale)))
        if k < below:
            out.append(k)
            below = k
    return out


def fit_hierarchy(centroids: np.ndarray, levels: list[int], *, clusters_configured: int, resampling_steps: int, resample_size: int | None,
                  niter: int, seed: int, gpu) -> tuple[list[int], list[np.ndarray]]:
    """(levels used, parent arrays) of the configured upper ``levels`` scaled to these centroids
    (``hierarchy_levels``); ``parents[j][c]`` is the level-(j+2) cluster of level-(j+1) cluster c.
    Fitted on the level-1 centroids alone."""
    from retrieval.hierarchical_kmeans import upper_levels

    used = hierarchy_levels(len(centroids), clusters_configured, levels)
    if not used:
        return [], []
    sizes, below = [], len(centroids)
    for k in used:
        sizes.append(resample_size or max(1, round(0.5 * below / k)))  # half the mean cluster size (ssl-data-curation)
        below = k
    fitted = upper_levels(centroids, used, resampling_steps=resampling_steps, sample_size=sizes, niter=niter, seed=seed, spherical=True, gpu=gpu)
    return used, [parent for _, parent in fitted]


def balanced_rng(seed: int, dataset: str) -> np.random.Generator:
    """The generator that breaks uneven splits for one seed dataset (same in every form)."""
    return np.random.default_rng([int(seed), zlib.crc32(dataset.encode())])


def balanced_limits(sizes: np.ndarray, seeds_per_cluster: np.ndarray, parents: list[np.ndarray], *, min_seeds: int, per_cluster: int,
                    cap: int, seed: int, dataset: str, pick: str):
    """(selected clusters, images each gives, capped, summary facts): the clusters holding more
    than ``min_seeds`` seeds, each able to give min(size, per_cluster), sampled down to ``cap``
    balanced top-down over the hierarchy (``parents``; empty = evenly over the clusters)."""
    from retrieval.hierarchical_kmeans import balanced_quotas

    selected = np.flatnonzero(seeds_per_cluster > min_seeds)
    capacity = np.zeros(len(sizes), np.int64)
    capacity[selected] = np.minimum(sizes[selected], per_cluster)
    quota = balanced_quotas(capacity, parents, cap, balanced_rng(seed, dataset))
    facts = {"sampling": "balanced", "pick": pick, **top_level_spread(quota, parents)}
    return selected.astype(np.int64), quota[selected], bool(capacity.sum() > cap), facts


def top_level_spread(limits_full: np.ndarray, parents: list[np.ndarray]) -> dict:
    """How the sampled images spread over the top level: the balance a user checks."""
    q = np.asarray(limits_full, np.int64)
    for parent in parents:
        q = np.bincount(parent, weights=q, minlength=int(parent.max(initial=-1)) + 1).astype(np.int64)
    used = q[q > 0]
    if not len(used):
        return {"top_clusters_used": 0}
    return {"top_clusters_used": int(len(used)), "images_per_top_cluster": [int(used.min()), float(np.median(used)), int(used.max())]}
