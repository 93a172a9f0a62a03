"""Retrieval partitioned: sample retrieval against index shards, cluster retrieval by cluster.

Sharded sample retrieval with an exact index per shard gives the single task's drops and
provenance row for row; cluster retrieval from a k-means trained on a sample selects the
documented images (closest to the centroid, round-robin under the cap), with every row
assigned to its cluster by the map step.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.retrieve.clusters import quota
from curation.stages.retrieve import STAGE
from curation.store import RunStore
from retrieval.cluster import cluster_retrieval, rank_in_cluster
from tests.partitioned_helpers import drops_of, run_parted, run_single, spec_for, write_run

D = 32


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def table_of(rows):
    """rows: (role, seed_dataset, vector or None) -> the ingest columns retrieve reads."""
    emb = np.stack([np.zeros(D, np.float32) if v is None else v for _, _, v in rows]).astype(np.float16)
    mask = pa.array([v is None for _, _, v in rows])
    return pa.table(
        {
            "role": [r for r, _, _ in rows],
            "id": [f"img{i}" for i in range(len(rows))],
            "seed_dataset": pa.array([d for _, d, _ in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), D, mask=mask),
        }
    )


def annotations_of(run_dir, spec) -> pa.Table:
    store = RunStore(run_dir)
    files = sorted((store.stage_dir(spec.rec()) / "annotations").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]).sort_by(schema.UID)
    return t.filter(pa.compute.is_valid(t.column("method")))


def run_form(tmp_path, form, rows, seeds, config=None, shard_rows=150, **execution):
    run_dir = tmp_path / form
    base = write_run(run_dir, table_of(rows), shard_rows)
    spec = spec_for(STAGE, config or {}, run_dir, base, seeds=seeds)
    stats = run_single(run_dir, spec) if form == "single" else run_parted(run_dir, spec, **execution)
    return stats, drops_of(run_dir, spec), annotations_of(run_dir, spec), RunStore(run_dir).steps_dir(spec.rec())


def crawl(n_pool=1200, seed=0):
    """A pool of 12 topics, seed sets drawn near pool images (so neighbours collide), a pool
    image without an embedding, and an excluded image."""
    rng = np.random.default_rng(seed)
    topics = unit(rng.standard_normal((12, D)))
    pool = unit(topics[rng.integers(0, 12, n_pool)] + 0.35 * rng.standard_normal((n_pool, D)))
    rows = [("pool", None, v) for v in pool]
    near = lambda i: unit(pool[i] + 0.2 * rng.standard_normal(D))
    rows += [("seed", "A", near(i)) for i in rng.integers(0, n_pool, 90)]
    rows += [("seed", "B", near(i)) for i in rng.integers(0, n_pool, 40)]
    rows += [("seed", "C", near(i)) for i in range(3)]
    rows += [("pool", None, None), ("exclude", None, near(0))]
    order = rng.permutation(len(rows))  # seeds spread over every shard
    return [rows[i] for i in order]


SEEDS = {
    "A": {"path": "/a", "recipes": [{"method": "sample", "k": 4, "min_similarity": None}]},
    "B": {"path": "/b", "recipes": [{"method": "sample", "k": 2, "min_similarity": 0.8}, {"method": "sample", "k": 6, "min_similarity": 0.9}]},
    "C": {"path": "/c", "recipes": [{"method": "as_is"}]},
}


def test_sharded_sample_retrieval_equals_the_single_task_with_exact_search(tmp_path):
    rows = crawl()
    single = run_form(tmp_path, "single", rows, SEEDS)
    parted = run_form(tmp_path, "partitioned", rows, SEEDS, max_partition_rows=100, map_task_rows=300)
    steps = {s["step"]: s["tasks"] for s in parted[0]["steps"]}
    assert steps["search"] >= 12 * 2  # several index shards x several query batches, one task each
    assert parted[1].equals(single[1])  # the same not_retrieved drops
    a, b = single[2], parted[2]
    for col in ("uid", "method", "seed_dataset", "seed_ids", "cluster_id"):
        assert a.column(col).to_pylist() == b.column(col).to_pylist(), col
    assert np.allclose(a.column("similarity").to_numpy(), b.column("similarity").to_numpy(), atol=1e-6)
    s, p = single[0]["summary"], parted[0]["summary"]
    for key in ("pool_images", "retrieved_unique", "not_retrieved", "shared_between_datasets"):
        assert s[key] == p[key], key
    for name in SEEDS:
        assert s["seed_datasets"][name] == p["seed_datasets"][name], name
    assert s["seed_datasets"]["A"]["collisions"] > 0  # collisions counted as the single task does
    assert p["sample_search"]["exact"] is True and p["sample_search"]["largest_shard"] <= 140


def test_approximate_shards_report_their_recall_against_exact_search(tmp_path):
    rows = crawl(seed=3)
    index = {"spec": "IVF8,Flat", "nprobe": 1, "recall_queries": 1000}
    stats, _, _, _ = run_form(tmp_path, "partitioned", rows, SEEDS, {"index": index}, max_partition_rows=400, map_task_rows=300)
    search = stats["summary"]["sample_search"]
    assert search["exact"] is False
    assert search["recall_queries"] == 130  # every sample-recipe seed sampled (fewer than recall_queries)
    assert 0.2 < search["recall"] < 1.0


def test_without_seed_datasets_the_partitioned_form_keeps_the_pool_whole(tmp_path):
    rows = crawl(n_pool=300)
    single = run_form(tmp_path, "single", rows, {})[:3]
    parted = run_form(tmp_path, "partitioned", rows, {}, max_partition_rows=100, map_task_rows=100)
    assert parted[1].num_rows == single[1].num_rows == 0
    assert parted[2].column("uid").to_pylist() == single[2].column("uid").to_pylist()
    assert set(parted[2].column("method").to_pylist()) == {"pool"}


def planted(rng, per_concept=60):
    """4 orthogonal concepts of ``per_concept`` pool images; their centroids are known."""
    concepts = np.eye(D)[:4]
    pool = np.concatenate([unit(c + 0.15 * rng.standard_normal((per_concept, D))) for c in concepts])
    return concepts, pool


def test_cluster_retrieval_from_a_sampled_kmeans_selects_the_closest_images_of_seeded_clusters(tmp_path):
    rng = np.random.default_rng(5)
    concepts, pool = planted(rng)
    rows = [("pool", None, v) for v in pool]
    near = lambda c: unit(concepts[c] + 0.1 * rng.standard_normal(D))
    rows += [("seed", "B", near(3)) for _ in range(5)] + [("seed", "B", near(0)) for _ in range(4)] + [("seed", "B", near(1)) for _ in range(2)]
    seeds = {"B": {"path": "/b", "recipes": [{"method": "cluster", "min_seeds": 3, "per_cluster": 10, "cap": 1000}]}}
    config = {"clustering": {"clusters": 4, "points_per_cluster": 60, "max_points_per_centroid": 40}}
    stats, drops, ann, steps_dir = run_form(tmp_path, "partitioned", rows, seeds, config, shard_rows=50, max_partition_rows=60, map_task_rows=60)
    uids = np.asarray(write_uids(len(rows), 50))
    # Documented selection: in the clusters of concepts 3 and 0 (more than 3 seeds; concept 1 has
    # 2), the 10 images closest to the centroid, with the centroids the sampled k-means found.
    centroids = np.load(steps_dir / "kmeans" / "artifact.npz")["centroids"]
    x = pool.astype(np.float16).astype(np.float32)
    sims = x @ centroids.T
    label = sims.argmax(1)
    expected = []
    for c in (0, 3):
        members = np.arange(c * 60, (c + 1) * 60)
        assert len(set(label[members])) == 1  # a concept is one cluster
        expected += uids[members[np.lexsort((members, -sims[members, label[members[0]]]))[:10]]].tolist()
    assert sorted(ann.column("uid").to_pylist()) == sorted(expected)
    assert set(ann.column("method").to_pylist()) == {"cluster"}
    assert len(set(ann.column("cluster_id").to_pylist())) == 2
    summary = stats["summary"]
    assert summary["pool_clustering"]["clusters"] == 4
    assert 120 <= summary["pool_clustering"]["train_rows"] <= 200  # a Bernoulli sample of about 4 x 40, not the 240
    recipe = summary["seed_datasets"]["B"]["recipes"][0]
    assert recipe["clusters_selected"] == 2 and recipe["retrieved"] == 20 and not recipe["capped"]
    assert drops.num_rows == 240 - 20
    steps = {s["step"]: s["tasks"] for s in stats["steps"]}
    assert steps["assign"] == 5  # the assignment is a map step over every group of shards


def write_uids(n, shard_rows):
    return [(s << schema.UID_SHARD_BITS) | r for s in range((n + shard_rows - 1) // shard_rows) for r in range(min(shard_rows, n - s * shard_rows))]


@pytest.mark.parametrize("cap", [1, 7, 13, 25, 10_000])
def test_cluster_quotas_reproduce_the_single_task_cap_order(cap):
    rng = np.random.default_rng(cap)
    C = 9
    labels = rng.integers(0, C, 400)
    closeness = rng.random(400).astype(np.float32)
    seed_labels = rng.integers(0, C, 60)
    single = cluster_retrieval(labels, closeness, seed_labels, C, min_seeds=5, per_cluster=12, cap=cap)
    sizes = np.bincount(labels, minlength=C)
    spc = np.bincount(seed_labels, minlength=C)
    limits, capped = quota(sizes, spc, single.selected_clusters, 12, cap)
    rank = rank_in_cluster(labels, closeness)
    lim = dict(zip(single.selected_clusters.tolist(), limits.tolist()))
    taken = np.flatnonzero([rank[i] < lim.get(int(labels[i]), 0) for i in range(400)])
    assert capped == single.capped
    assert taken.tolist() == single.pool_idx.tolist()


def two_level_crawl(rng, per=40):
    """Concept A in three nearby sub-concepts, concepts B and C alone; seeds in A's three and in B."""
    e = np.eye(D)
    subs = [unit(e[0] + 0.6 * e[i]) for i in (2, 3, 4)] + [e[1], e[5]]
    pool = np.concatenate([unit(c + 0.05 * rng.standard_normal((per, D))) for c in subs])
    rows = [("pool", None, v) for v in pool]
    for c in subs[:4]:
        rows += [("seed", "S", unit(c + 0.05 * rng.standard_normal(D))) for _ in range(4)]
    order = rng.permutation(len(rows))
    return [rows[i] for i in order], order, pool


@pytest.mark.parametrize("pick", ["random", "closest"])
def test_hierarchical_balanced_sampling_splits_the_cap_over_the_top_level_in_both_forms(tmp_path, pick):
    rng = np.random.default_rng(11)
    rows, order, _ = two_level_crawl(rng)
    concept_of_row = [(int(i) // 40 if i < 200 else -1) for i in order]  # the planted sub-concept of each row, -1 for seeds
    seeds = {"S": {"path": "/s", "recipes": [{"method": "cluster", "min_seeds": 3, "per_cluster": 1000, "cap": 60, "sampling": "balanced", "pick": pick}]}}
    config = {"clustering": {"clusters": 5, "points_per_cluster": 40, "hierarchy": {"levels": [2], "resampling_steps": 2}}}
    single = run_form(tmp_path / "s", "single", rows, seeds, config, shard_rows=50)
    parted = run_form(tmp_path / "p", "partitioned", rows, seeds, config, shard_rows=50, max_partition_rows=60, map_task_rows=60)
    uids = write_uids(len(rows), 50)
    concept = dict(zip(uids, concept_of_row))
    for stats, _, ann, _ in (single, parted):
        counts = np.bincount([concept[u] for u in ann.column("uid").to_pylist()], minlength=5).tolist()
        # A and (B, C) share the cap of 60 evenly; A's 30 go 10 to each sub-concept; C has no seeds.
        assert counts == [10, 10, 10, 30, 0], counts
        s = stats["summary"]
        assert s["pool_clustering"]["levels"] == [5, 2]
        recipe = s["seed_datasets"]["S"]["recipes"][0]
        assert (recipe["sampling"], recipe["pick"], recipe["capped"]) == ("balanced", pick, True)
        assert recipe["top_clusters_used"] == 2 and recipe["images_per_top_cluster"] == [30, 30.0, 30]
    if pick == "random":  # a hash order of the uids: the same images in both forms
        assert single[2].column("uid").to_pylist() == parted[2].column("uid").to_pylist()
    assert single[1].num_rows == parted[1].num_rows == 200 - 60


def test_balanced_without_upper_levels_splits_the_cap_evenly_over_the_selected_clusters(tmp_path):
    rng = np.random.default_rng(11)
    rows, order, _ = two_level_crawl(rng)
    concept_of_row = [(int(i) // 40 if i < 200 else -1) for i in order]
    seeds = {"S": {"path": "/s", "recipes": [{"method": "cluster", "min_seeds": 3, "per_cluster": 1000, "cap": 60, "sampling": "balanced"}]}}
    config = {"clustering": {"clusters": 5, "points_per_cluster": 40}}
    _, _, ann, _ = run_form(tmp_path, "partitioned", rows, seeds, config, shard_rows=50, max_partition_rows=60, map_task_rows=60)
    concept = dict(zip(write_uids(len(rows), 50), concept_of_row))
    assert np.bincount([concept[u] for u in ann.column("uid").to_pylist()], minlength=5).tolist() == [15, 15, 15, 15, 0]
