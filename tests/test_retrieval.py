"""Retrieval on synthetic embeddings whose answers are known exactly."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.cluster import cluster_params, cluster_retrieval, hierarchy_levels, rank_in_cluster, scaled_clusters
from retrieval.hierarchical_kmeans import (
    HierarchicalKMeans,
    Level,
    balanced_quotas,
    balanced_sample,
    closest_per_cluster,
    hierarchical_kmeans,
    pick_rank,
    water_fill,
)
from retrieval.kmeans import _torch_lloyd, assign, kmeans
from retrieval.sample import sample_retrieval


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted(n_per, centres, noise, seed=0):
    """Points scattered around unit ``centres``; returns (x, true label)."""
    rng = np.random.default_rng(seed)
    centres = unit(centres)
    x = np.concatenate([unit(c + noise * rng.standard_normal((n, len(c)))) for c, n in zip(centres, n_per)])
    return x.astype(np.float32), np.repeat(np.arange(len(centres)), n_per)


def same_partition(a, b):
    """Labels equal up to renaming."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


# -- k-means --------------------------------------------------------------------------------
def test_kmeans_recovers_planted_clusters_and_is_deterministic():
    x, truth = planted([40, 60, 30, 50], np.eye(16)[:4] * 1.0, noise=0.05)
    a = kmeans(x, 4, seed=3)
    b = kmeans(x, 4, seed=3)
    assert same_partition(a.labels, truth)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert sorted(a.sizes().tolist()) == [30, 40, 50, 60]
    # Spherical: unit centroids, scores are cosine similarities to them.
    np.testing.assert_allclose(np.linalg.norm(a.centroids, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(a.scores, np.einsum("nd,nd->n", x, a.centroids[a.labels]), atol=1e-5)


def test_torch_lloyd_matches_the_planted_partition_on_cpu():
    x, truth = planted([40, 60, 30], np.eye(8)[:3], noise=0.05, seed=1)
    centroids = _torch_lloyd(x, 3, niter=10, seed=0, spherical=True, max_points_per_centroid=256, init_centroids=None, device="cpu")
    labels, _ = assign(x, centroids)
    assert same_partition(labels, truth)


def test_kmeans_rejects_more_clusters_than_points():
    with pytest.raises(ValueError, match="k-means needs"):
        kmeans(np.eye(4, dtype=np.float32), 5)


# -- sample-based retrieval --------------------------------------------------------------------
def basis_pool(n=64):
    return np.eye(n, dtype=np.float32)


def test_sample_retrieval_returns_the_planted_neighbours_in_order():
    pool = basis_pool()
    seeds = unit([[3 if i == 10 else 2 if i == 20 else 1 if i == 30 else 0 for i in range(64)]])
    r = sample_retrieval(pool, seeds, k=3)
    assert r.pool_idx.tolist() == [10, 20, 30]
    np.testing.assert_allclose(r.similarity, np.array([3, 2, 1]) / np.sqrt(14), atol=1e-6)
    assert r.seed_idx.tolist() == [0, 0, 0]


def test_sample_retrieval_counts_collisions_and_keeps_every_seed_link():
    pool = basis_pool()
    w = lambda a, b, c: [3 if i == a else 2 if i == b else 1 if i == c else 0 for i in range(64)]
    seeds = unit([w(0, 1, 2), w(1, 5, 6), w(1, 7, 8)])
    r = sample_retrieval(pool, seeds, k=3)
    assert r.retrieved == 9
    assert r.unique.tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert r.collisions == 2  # pool image 1 was asked for by three seeds
    links_of_1 = r.seed_idx[r.pool_idx == 1]
    assert links_of_1.tolist() == [1, 2, 0]  # best similarity first (3 > 3 > 2), ties by seed


def test_sample_retrieval_min_similarity_drops_weak_neighbours():
    pool = basis_pool()
    seeds = unit([[3 if i == 4 else 2 if i == 9 else 1 if i == 11 else 0 for i in range(64)]])
    r = sample_retrieval(pool, seeds, k=3, min_similarity=0.5)
    assert r.pool_idx.tolist() == [4, 9]  # 1/sqrt(14) = 0.27 falls below 0.5


# -- cluster-based retrieval -------------------------------------------------------------------
def test_rank_in_cluster_orders_by_closeness_then_index():
    labels = np.array([0, 1, 0, 0, 1])
    close = np.array([0.5, 0.9, 0.7, 0.5, 0.1], np.float32)
    assert rank_in_cluster(labels, close).tolist() == [1, 0, 0, 2, 1]


def test_cluster_retrieval_takes_clusters_with_more_than_min_seeds():
    # 3 clusters of 4 pool images; closeness decides the order inside a cluster.
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    close = np.array([0.1, 0.9, 0.5, 0.7, 0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1], np.float32)
    seeds = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])  # 4, 3, 5 seeds per cluster
    r = cluster_retrieval(labels, close, seeds, 3, min_seeds=3, per_cluster=2, cap=100)
    assert r.selected_clusters.tolist() == [0, 2]  # cluster 1 holds exactly 3: not "more than 3"
    assert r.pool_idx.tolist() == [1, 3, 8, 9]  # two closest of cluster 0 (0.9, 0.7) and cluster 2
    assert r.cluster.tolist() == [0, 0, 2, 2]
    assert not r.capped


def test_cluster_retrieval_cap_serves_clusters_round_robin():
    labels = np.array([0] * 5 + [1] * 5)
    close = np.linspace(1, 0, 10).astype(np.float32)  # index order = closeness order per cluster
    seeds = np.array([0] * 4 + [1] * 6)
    r = cluster_retrieval(labels, close, seeds, 2, min_seeds=3, per_cluster=5, cap=5)
    assert r.capped
    # ranks 0,1 of both clusters, then rank 2 of the most-seeded cluster (1).
    assert r.pool_idx.tolist() == [0, 1, 5, 6, 7]


def test_cluster_params_follow_paper_at_scale_and_scale_down_for_small_pools():
    big = cluster_params(744_000_000, per_cluster=10_000)
    assert (big.clusters, big.per_cluster) == (100_000, 10_000)
    small = cluster_params(3_000, per_cluster=10_000)
    assert small.clusters == 30 and small.per_cluster == 135  # ceil(1.344 * 100)
    assert "round(N/100)" in small.rule
    assert scaled_clusters(150) == 2 and scaled_clusters(1) == 1


def test_cluster_retrieval_on_planted_embeddings():
    """k-means of a pool with 4 planted concepts; seeds near concepts 0 (5) and 2 (4) only."""
    pool, truth = planted([30, 30, 30, 30], np.eye(32)[:4], noise=0.1, seed=2)
    seeds, seed_truth = planted([5, 2, 4], np.eye(32)[[0, 1, 2]], noise=0.1, seed=3)
    km = kmeans(pool, 4, seed=0)
    seed_labels, _ = assign(seeds, km.centroids)
    r = cluster_retrieval(km.labels, km.scores, seed_labels, 4, min_seeds=3, per_cluster=10, cap=1000)
    assert set(truth[r.pool_idx].tolist()) == {0, 2}
    for concept in (0, 2):
        members = np.flatnonzero(truth == concept)
        expected = members[np.argsort(-km.scores[members], kind="stable")[:10]]
        assert sorted(expected.tolist()) == sorted(r.pool_idx[truth[r.pool_idx] == concept].tolist())


# -- hierarchical k-means and balanced sampling ----------------------------------------------
def test_water_fill_gives_small_groups_everything_and_splits_the_rest_evenly():
    rng = np.random.default_rng(0)
    assert water_fill(np.array([2, 10, 10]), 12, rng).tolist() == [2, 5, 5]
    assert water_fill(np.array([2, 10, 10]), 100, rng).tolist() == [2, 10, 10]
    uneven = water_fill(np.array([1, 5, 10]), 10, rng)
    assert uneven[0] == 1 and sorted(uneven[1:].tolist()) == [4, 5]


def test_closest_per_cluster_keeps_the_m_best_of_each_cluster():
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.2, 0.9, 0.5, 0.3, 0.4], np.float32)
    assert closest_per_cluster(labels, scores, 2).tolist() == [1, 2, 3, 4]
    assert closest_per_cluster(labels, scores, 1).tolist() == [1, 4]


def test_balanced_sample_splits_quota_top_down():
    # Level 1: clusters 0,1,2 (concept A, 300 points each) and 3 (concept B, 100 points).
    labels1 = np.repeat([0, 1, 2, 3], [300, 300, 300, 100])
    hkm = HierarchicalKMeans(
        levels=[Level(np.zeros((4, 2), np.float32), labels1), Level(np.zeros((2, 2), np.float32), np.array([0, 0, 0, 1]))],
        n_points=1000,
        point_scores=np.zeros(1000, np.float32),
    )
    picked = balanced_sample(hkm, 400, seed=0)
    per_cluster = np.bincount(labels1[picked], minlength=4)
    assert per_cluster[3] == 100  # B gets half of the quota: all it has
    assert sorted(per_cluster[:3].tolist()) == [100, 100, 100]  # A's 300 split over its 3 children
    assert len(np.unique(picked)) == 400


def test_balanced_sample_closest_strategy_is_deterministic():
    labels1 = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.9, 0.5, 0.8, 0.2, 0.7], np.float32)
    hkm = HierarchicalKMeans([Level(np.zeros((2, 2), np.float32), labels1)], 6, scores)
    assert balanced_sample(hkm, 4, strategy="closest").tolist() == [1, 2, 3, 5]


def test_hierarchical_kmeans_levels_nest_planted_concepts():
    # 2 concepts, each made of 3 sub-concepts (nearby directions).
    base = np.eye(16)
    centres = [base[0] + 0.3 * base[i] for i in (2, 3, 4)] + [base[1] + 0.3 * base[i] for i in (5, 6, 7)]
    x, sub = planted([40, 40, 40, 40, 40, 40], centres, noise=0.03, seed=4)
    hkm = hierarchical_kmeans(x, [6, 2], resampling_steps=2, sample_size=10, seed=0)
    assert same_partition(hkm.labels(1), sub)
    assert same_partition(hkm.labels(2), sub // 3)
    assert hkm.cluster_sizes(2).tolist() == [120, 120]


def test_balanced_quotas_split_the_target_evenly_at_every_level_within_capacity():
    # Level 1: A1, A2, A3 (under top cluster A) and B1 (alone under B); A3 can give only 5.
    capacity = np.array([100, 100, 5, 200])
    parents = [np.array([0, 0, 0, 1])]
    quota = balanced_quotas(capacity, parents, 60, np.random.default_rng(0))
    assert quota[3] == 30 and quota[2] == 5  # B gets half; A3 all it has
    assert sorted(quota[:2].tolist()) == [12, 13]  # A's other 25 split over A1, A2
    flat = balanced_quotas(capacity, [], 60, np.random.default_rng(0))
    assert flat[2] == 5 and sorted(flat[[0, 1, 3]].tolist()) == [18, 18, 19]  # one level: evenly over clusters
    assert balanced_quotas(np.array([0, 4, 0, 3]), parents, 100, np.random.default_rng(0)).tolist() == [0, 4, 0, 3]


def test_pick_rank_orders_each_cluster_the_same_way_whatever_the_row_order():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 5, 300)
    uids = rng.permutation(10_000)[:300].astype(np.int64)
    scores = rng.random(300).astype(np.float32)
    for pick in ("random", "closest"):
        rank = pick_rank(labels, uids, scores, pick, seed=7)
        perm = rng.permutation(300)
        assert (pick_rank(labels[perm], uids[perm], scores[perm], pick, seed=7) == rank[perm]).all()
        for c in range(5):
            assert sorted(rank[labels == c].tolist()) == list(range(int((labels == c).sum())))
    closest = pick_rank(labels, uids, scores, "closest", seed=7)
    best = [np.flatnonzero(labels == c)[np.argmax(scores[labels == c])] for c in range(5)]
    assert (closest[best] == 0).all()
    assert (pick_rank(labels, uids, scores, "random", seed=8) != pick_rank(labels, uids, scores, "random", seed=7)).any()


def test_hierarchy_levels_scale_with_the_pool_clustering_and_drop_levels_that_merge_nothing():
    assert hierarchy_levels(100_000, 100_000, [10_000, 1_000]) == [10_000, 1_000]
    assert hierarchy_levels(1_000, 100_000, [10_000, 1_000]) == [100, 10]
    assert hierarchy_levels(30, 100_000, [10_000, 1_000]) == [3, 2]  # at least 2 clusters while the level below has more
    assert hierarchy_levels(4, 100_000, [10_000, 1_000]) == [2]  # the top level would merge nothing: left out
    assert hierarchy_levels(30, 30, []) == []
