"""The retrieve stage on planted embeddings: which pool rows survive, with which provenance."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from curation.stage import StageContext
from curation.stages.retrieve import STAGE, RetrieveConfig

D = 32


def unit(x):
    x = np.asarray(x, np.float32)
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def planted_pool(seed=0):
    """4 concepts (directions e0..e3) x 25 images; row 75 is exactly e3, the centre of concept 3."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([unit(np.eye(D)[c] + 0.1 * rng.standard_normal((25, D))) for c in range(4)])
    x[75] = np.eye(D)[3]
    return x


def make_table(rows):
    """rows: (role, seed_dataset, vector or None)."""
    emb = np.stack([np.zeros(D, np.float32) if v is None else v for _, _, v in rows]).astype(np.float16)
    mask = pa.array([v is None for _, _, v in rows])
    return pa.table(
        {
            "uid": pa.array(range(len(rows)), pa.int64()),
            "role": [r for r, _, _ in rows],
            "id": [f"img{i}" for i in range(len(rows))],
            "seed_dataset": pa.array([d for _, d, _ in rows], pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), D, mask=mask),
        }
    )


@pytest.fixture
def scenario(tmp_path):
    pool = planted_pool()
    rng = np.random.default_rng(1)
    near = lambda v: unit(v + 0.01 * rng.standard_normal(D))
    rows = [("pool", None, v) for v in pool]
    # Dataset A (sample, k=1): copies of pool rows 5, 5 (a collision) and 75.
    rows += [("seed", "A", near(pool[5])), ("seed", "A", near(pool[5])), ("seed", "A", near(pool[75]))]
    # Dataset B (cluster): 4 seeds in concept 3 (> min_seeds=3), 2 in concept 1 (not enough).
    rows += [("seed", "B", near(np.eye(D)[3] + 0.05 * rng.standard_normal(D))) for _ in range(4)]
    rows += [("seed", "B", near(np.eye(D)[1])) for _ in range(2)]
    rows += [("seed", "C", near(pool[40])), ("exclude", None, near(pool[41]))]
    rows += [("pool", None, None)]  # a pool image without an embedding cannot be retrieved
    seeds = {
        "A": {"path": "/a", "recipes": [{"method": "sample", "k": 1, "min_similarity": None}]},
        "B": {"path": "/b", "recipes": [{"method": "cluster", "min_seeds": 3, "per_cluster": 10, "cap": 1000}]},
        "C": {"path": "/c", "recipes": [{"method": "as_is"}]},
    }
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", seeds=seeds)
    cfg = RetrieveConfig(kind="retrieve", clustering={"points_per_cluster": 25})
    return pool, make_table(rows), STAGE(cfg, ctx)


def test_retrieve_keeps_planted_neighbours_and_clusters_with_provenance(scenario):
    pool, table, stage = scenario
    result = stage.run(table)
    ann = {r["uid"]: r for r in result.annotations.to_pylist()}

    concept3 = np.arange(75, 100)
    expected_cluster = concept3[np.argsort(-(pool[concept3] @ unit(pool[concept3].mean(0))), kind="stable")[:10]]
    assert 75 in expected_cluster
    assert sorted(ann) == sorted({5, *expected_cluster.tolist()})

    assert ann[5]["method"] == "sample" and ann[5]["seed_dataset"] == "A"
    assert sorted(ann[5]["seed_ids"]) == ["img100", "img101"]  # both seeds that asked for it
    assert ann[5]["similarity"] > 0.99 and ann[5]["cluster_id"] is None

    assert ann[75]["method"] == "sample+cluster" and ann[75]["seed_dataset"] == "A,B"
    assert ann[75]["seed_ids"][0] == "img102"  # the near-copy seed is the most similar link
    clusters = {ann[u]["cluster_id"] for u in expected_cluster}
    assert len(clusters) == 1 and None not in clusters
    other = [u for u in expected_cluster if u != 75][0]
    assert ann[other]["method"] == "cluster" and sorted(ann[other]["seed_ids"]) == ["img103", "img104", "img105", "img106"]

    dropped = result.drops.to_pylist()
    assert {d["drop_reason"] for d in dropped} == {"not_retrieved"}
    pool_uids = set(range(100)) | {111}
    assert {d["uid"] for d in dropped} == pool_uids - set(ann)  # seeds and excludes are never dropped here


def test_retrieve_summary_reports_table15_figures(scenario):
    _, table, stage = scenario
    s = stage.run(table).summary
    a, b, c = (s["seed_datasets"][k] for k in "ABC")
    assert (a["seed_images"], a["retrieved"], a["final"], a["collisions"]) == (3, 3, 2, 1)
    assert (b["seed_images"], b["retrieved"], b["final"], b["collisions"]) == (6, 10, 10, 0)
    assert b["recipes"][0]["clusters_selected"] == 1 and "round(N/25)" in b["recipes"][0]["rule"]
    assert c["recipes"] == [{"method": "as_is", "images": 1}] and c["final"] == 0
    assert s["pool_clustering"]["clusters"] == 4
    assert s["shared_between_datasets"] == 1
    assert s["retrieved_unique"] == 11 and s["not_retrieved"] == 90


def test_retrieve_min_similarity_and_k(tmp_path):
    pool = planted_pool()
    rows = [("pool", None, v) for v in pool] + [("seed", "A", unit(pool[10] + pool[11]))]
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", seeds={"A": {"recipes": [{"method": "sample", "k": 3, "min_similarity": 0.6}]}})
    result = STAGE(RetrieveConfig(kind="retrieve"), ctx).run(make_table(rows))
    kept = sorted(result.annotations.column("uid").to_pylist())
    sims = pool @ unit(pool[10] + pool[11])
    expected = sorted(np.argsort(-sims)[:3][sims[np.argsort(-sims)[:3]] >= 0.6].tolist())
    assert kept == expected and {10, 11} <= set(kept)


def test_without_seed_datasets_the_pool_is_kept_whole(tmp_path):
    rows = [("pool", None, v) for v in planted_pool()[:10]]
    stage = STAGE(RetrieveConfig(kind="retrieve"), StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s"))
    result = stage.run(make_table(rows))
    assert result.drops.num_rows == 0
    assert set(result.annotations.column("method").to_pylist()) == {"pool"}
    assert "skipped" in result.summary


def test_resampled_clustering_gives_the_same_planted_picks(scenario):
    _, table, stage = scenario
    stage.config = stage.config.model_copy(update={"clustering": stage.config.clustering.model_copy(update={"resampling_steps": 2, "resample_size": 5})})
    result = stage.run(table)
    assert result.summary["pool_clustering"]["resampling_steps"] == 2
    assert result.summary["seed_datasets"]["B"]["final"] == 10
