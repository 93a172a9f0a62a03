"""retrieval.index: exact search must be exact; approximate search must say how good it is."""

import numpy as np
import pytest

from curation.dedup.synthetic import planted_groups
from retrieval.index import (
    AUTO_FLAT_MAX_CPU,
    KnnIndex,
    SearchParams,
    auto_spec,
    build_index,
    knn_search,
    l2_normalize,
)


def brute_force(xb, xq, k):
    sims = xq @ xb.T
    ids = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(sims, ids, 1), ids


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    xb = l2_normalize(rng.standard_normal((3000, 48)))
    xq = l2_normalize(rng.standard_normal((200, 48)))
    return xb, xq


def test_flat_is_exact(data):
    xb, xq = data
    sims, ids = knn_search(xb, xq, 10, spec="Flat", gpu="never")
    ref_sims, ref_ids = brute_force(xb, xq, 10)
    assert sims.dtype == np.float32 and ids.dtype == np.int64 and sims.shape == (200, 10)
    assert (ids == ref_ids).all()
    np.testing.assert_allclose(sims, ref_sims, atol=1e-5)


def test_shards_and_query_chunks_give_the_same_answer(data):
    xb, xq = data
    ref_sims, ref_ids = knn_search(xb, xq, 7, spec="Flat", gpu="never")
    index = KnnIndex(dim=48, spec="Flat", gpu="never", max_vectors_per_shard=700, params=SearchParams(query_batch=33)).add(xb)
    sims, ids = index.search(xq, 7)
    assert index.describe()["shards"] == 5
    assert (ids == ref_ids).all()
    np.testing.assert_allclose(sims, ref_sims, atol=1e-6)


def test_torch_exact_backend_matches_faiss(data):
    pytest.importorskip("torch")
    xb, xq = data
    ref_sims, ref_ids = knn_search(xb, xq, 5, spec="Flat", gpu="never")
    index = KnnIndex(dim=48, spec="Flat", backend="torch", max_vectors_per_shard=1000).add(xb)
    assert index.describe()["backend"] == "torch"
    sims, ids = index.search(xq, 5)
    assert (ids == ref_ids).mean() > 0.99  # fp16 on a GPU may swap near-ties
    np.testing.assert_allclose(sims, ref_sims, atol=2e-3)


def test_fewer_vectors_than_k_pads_with_minus_one(data):
    xb, xq = data
    sims, ids = knn_search(xb[:3], xq[:2], 5, spec="Flat", gpu="never")
    assert (ids[:, 3:] == -1).all() and set(ids[0, :3]) == {0, 1, 2}


def test_l2_metric_returns_squared_distances(data):
    xb, xq = data
    d, ids = knn_search(xb, xq[:5], 3, spec="Flat", metric="l2", gpu="never")
    ref = ((xq[:5, None, :] - xb[ids]) ** 2).sum(-1)
    np.testing.assert_allclose(d, ref, atol=1e-4)
    assert (np.diff(d, axis=1) >= 0).all()


def test_auto_choice_by_size():
    assert auto_spec(AUTO_FLAT_MAX_CPU, 512) == "Flat"
    big = auto_spec(1_000_000, 512)
    assert big == "IVF4096,SQ8"
    assert auto_spec(10_000_000, 512, backend="torch") == "Flat"
    assert build_index(64, 1000, spec="HNSW32").ntotal == 0


@pytest.mark.parametrize("spec", ["HNSW32", "IVF64,PQ16x4fs"])
def test_approximate_indices_find_planted_copies_with_exact_similarities(spec):
    planted = planted_groups(8000, 64, duplicate_fraction=0.2, seed=3)
    x = planted.x
    index = KnnIndex(dim=64, spec=spec, gpu="never", params=SearchParams(nprobe=8, ef_search=64)).add(x)
    sims, ids = index.search(x, 6)
    # Similarities are re-scored exactly, whatever the index.
    np.testing.assert_allclose(sims, np.einsum("qd,qkd->qk", x, x[ids]), atol=1e-5)
    _, exact_ids = knn_search(x, x, 6, spec="Flat", gpu="never")
    recall = np.mean([len(set(a) & set(b)) / 6 for a, b in zip(ids, exact_ids)])
    found = sum(1 for i, j in planted.true_pairs() if j in ids[i] or i in ids[j])
    planted_recall = found / len(planted.true_pairs())
    print(f"{spec}: recall@6 vs exact {recall:.3f}, planted-copy recall {planted_recall:.4f}")
    assert planted_recall > 0.98
    assert recall > 0.5
