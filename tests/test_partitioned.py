"""The partitioned form of every deduplication stage gives the same drops, ledger and kept
representatives as its single-task form, wherever the partitioned search is exact.

Each case writes the same shards twice and runs the stage once per form (tasks in-process; the
Ray runs are in test_partitioned_ray.py). Small ``max_partition_rows`` / ``map_task_rows`` make
the shuffle real: many map tasks, many partitions, components spanning partitions.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from curation import schema
from curation.dedup.synthetic import planted_groups
from curation.partitioned import files
from curation.stages.copy_dedup import CopyDedupStage
from curation.stages.decontaminate import DecontaminateStage
from curation.stages.exact_dedup import ExactDedupStage
from curation.stages.pca_hash import PcaHashStage
from curation.stages.phash_dedup import PhashDedupStage
from tests.partitioned_helpers import both_forms

SMALL = {"max_partition_rows": 300, "map_task_rows": 400}


def fixed_list(x: np.ndarray, dtype=pa.float16()) -> pa.Array:
    np_dtype = np.float16 if dtype == pa.float16() else np.float32
    return pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np_dtype).reshape(-1), dtype), x.shape[1])


def sizes(n: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {"width": pa.array(rng.integers(50, 400, n), pa.int32()), "height": pa.array(rng.integers(50, 400, n), pa.int32())}


def assert_same(results):
    (single, d1, l1), (parted, d2, l2) = results
    assert d1.num_rows > 0, "the case must drop something"
    assert d1.equals(d2), first_difference(d1, d2)
    assert l1.equals(l2)
    assert single["execution"] == "single_task" and parted["execution"] == "partitioned"
    assert single["dropped"] == parted["dropped"] and single["out"] == parted["out"]
    return single, parted


def first_difference(a: pa.Table, b: pa.Table) -> str:
    da = {u: (r, d) for u, r, d in zip(*(a.column(c).to_pylist() for c in a.column_names))}
    db = {u: (r, d) for u, r, d in zip(*(b.column(c).to_pylist() for c in b.column_names))}
    only_a, only_b = sorted(set(da) - set(db))[:3], sorted(set(db) - set(da))[:3]
    diff = [(u, da[u], db[u]) for u in sorted(set(da) & set(db)) if da[u] != db[u]][:3]
    return f"only single: {only_a}; only partitioned: {only_b}; different details: {diff}"


def tasks_of(stats: dict, step: str) -> int:
    return next(s["tasks"] for s in stats["steps"] if s["step"] == step)


# -- exact_dedup -----------------------------------------------------------------------------
def test_exact_dedup_forms_agree_across_roles_and_partitions(tmp_path):
    rng = np.random.default_rng(0)
    n = 1200
    ids = [f"{x:064x}" for x in rng.integers(0, 400, n)]
    roles = rng.choice([schema.POOL] * 6 + [schema.SEED, schema.EXCLUDE], n)
    seed_ds = [("in1k" if rng.random() < 0.5 else "gld") if r == schema.SEED else None for r in roles]
    table = pa.table({"id": pa.array(ids), "role": pa.array(roles), "seed_dataset": pa.array(seed_ds, pa.string())})
    seeds = {"in1k": {"recipes": [{"method": "as_is"}]}, "gld": {"recipes": [{"method": "sample", "k": 4}]}}
    from tests import partitioned_helpers as h

    out = []
    for form in ("single", "partitioned"):
        run_dir = tmp_path / form
        base = h.write_run(run_dir, table, shard_rows=97)
        spec = h.spec_for(ExactDedupStage, {}, run_dir, base, seeds=seeds)
        stats = h.run_single(run_dir, spec) if form == "single" else h.run_parted(run_dir, spec, **SMALL)
        out.append((stats, h.drops_of(run_dir, spec), h.ledger_of(run_dir, spec)))
    single, parted = assert_same(out)
    assert parted["summary"] == single["summary"]
    assert tasks_of(parted, "by_id") > 1 and tasks_of(parted, "first") > 1


# -- phash_dedup -----------------------------------------------------------------------------
def hash_table(n: int, seed: int = 0) -> tuple[pa.Table, np.ndarray]:
    """Random 64-bit hashes with planted copies (1-3 bits flipped), mirrored copies (matching
    through the flip column) and a chain of one-bit steps whose ends are far apart."""
    rng = np.random.default_rng(seed)
    h = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64) | (rng.integers(0, 2, n).astype(np.uint64) << np.uint64(63))
    flip = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64)
    copies = rng.choice(n, size=n // 4, replace=False)
    src, dst = copies[: n // 8], copies[n // 8 :]
    for s, d in zip(src, dst):
        bits = rng.choice(64, size=rng.integers(1, 4), replace=False)
        h[d] = h[s] ^ np.bitwise_or.reduce(np.uint64(1) << bits.astype(np.uint64))
    mirrored = rng.choice(np.setdiff1d(np.arange(n), copies), size=n // 20, replace=False)
    flip[mirrored[1:]] = h[mirrored[:-1]] ^ np.uint64(1)  # each mirror matches the previous one
    chain = np.setdiff1d(np.arange(n), np.concatenate([copies, mirrored]))[:60]
    for a, b in zip(chain[:-1], chain[1:]):
        h[b] = h[a] ^ (np.uint64(1) << np.uint64(rng.integers(0, 64)))
    table = pa.table({"phash": pa.array(h, pa.uint64()), "phash_flip": pa.array(flip, pa.uint64()), **sizes(n, seed)})
    return table, chain


@pytest.mark.parametrize("grouping, buckets", [("components", "substrings"), ("star", "substrings"), ("components", "pairs")])
def test_phash_dedup_forms_agree_with_mirrors_and_a_chain_across_partitions(tmp_path, grouping, buckets):
    table, chain = hash_table(2400)
    config = {"radius": 4, "grouping": grouping, "buckets": buckets}
    single, parted = assert_same(both_forms(tmp_path, table, PhashDedupStage, config, shard_rows=150, **SMALL))
    assert parted["summary"]["keys_per_code"] == (15 if buckets == "pairs" else 5)  # C(6, 2) pairs of 6 substrings, or 5
    for key in ("components", "dropped", "largest_group"):
        assert parted["summary"][key] == single["summary"][key]
    if grouping == "components":
        assert single["summary"]["largest_group"] >= len(chain)  # the chain is one component
    else:  # under star no drop is further than the radius from the image kept in its place
        assert single["summary"]["largest_group"] < len(chain)
    assert tasks_of(parted, "pairs") > 5 and any(s["step"].startswith("components.r") for s in parted["steps"])


@pytest.mark.parametrize("buckets", ["substrings", "pairs"])
def test_a_huge_hash_bucket_is_streamed_in_chunks_and_agrees(tmp_path, monkeypatch, buckets):
    monkeypatch.setattr(files, "CHUNK_ROWS", 256)  # so the blank bucket spans many row groups
    table, _ = hash_table(2000, seed=1)
    h = table.column("phash").to_numpy().copy()
    flip = table.column("phash_flip").to_numpy().copy()
    h[:1200] = 0  # a blank image, 1,200 times
    flip[:1200] = 0
    h[1200] = 0b101  # two bits from blank: joins its component
    table = table.set_column(0, "phash", pa.array(h, pa.uint64())).set_column(1, "phash_flip", pa.array(flip, pa.uint64()))
    single, parted = assert_same(both_forms(tmp_path, table, PhashDedupStage, {"radius": 3, "buckets": buckets}, shard_rows=150, **SMALL))
    assert single["summary"]["largest_group"] >= 1201 and parted["summary"]["largest_group"] == single["summary"]["largest_group"]
    assert parted["summary"]["largest_bucket_partition_rows"] > 1200  # held as distinct codes, not pairs


def test_phash_dedup_with_buckets_split_again_agrees(tmp_path, monkeypatch):
    """Buckets of a crawl's worth of codes are split on their free bits (``sub_buckets``): forced
    here from 24 codes on, with mirrors, chains and a blank image in the same run."""
    from curation.dedup import sub_buckets

    monkeypatch.setattr(sub_buckets, "SPLIT_MIN", 24)
    monkeypatch.setattr(sub_buckets, "SUB_BUCKET_TARGET", 4)
    table, chain = hash_table(3000, seed=5)
    h = table.column("phash").to_numpy().copy()
    h[:300] &= np.uint64(0xFFFF)  # 300 near-blank hashes: large buckets on most substrings
    table = table.set_column(0, "phash", pa.array(h, pa.uint64()))
    single, parted = assert_same(both_forms(tmp_path, table, PhashDedupStage, {"radius": 6}, shard_rows=400, **SMALL))
    assert single["summary"]["largest_group"] >= len(chain)


@pytest.mark.parametrize("buckets", ["substrings", "pairs"])
def test_phash_dedup_without_flip_agrees(tmp_path, buckets):
    table, _ = hash_table(1500, seed=2)
    assert_same(both_forms(tmp_path, table, PhashDedupStage, {"radius": 6, "flip": False, "buckets": buckets}, shard_rows=200, **SMALL))


def test_pair_buckets_find_every_pair_within_the_radius_and_cut_the_comparisons():
    """Two codes within r agree on at least 2 of r + 2 substrings, so they share a pair key."""
    from curation.dedup.multi_index import bucket_keys, key_scheme

    rng = np.random.default_rng(4)
    a = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    flips = np.zeros((3000, 64), np.uint8)
    for row, k in enumerate(rng.integers(0, 7, 3000)):  # 0..6 bits flipped
        flips[row, rng.choice(64, k, replace=False)] = 1
    b = a ^ np.packbits(flips, axis=1)
    pairs = key_scheme(64, 6, "pairs")
    assert pairs.describe() == "8 substrings, buckets on 2 of them (28 per code)"
    assert key_scheme(64, 6).describe() == "7 substrings, buckets on 1 of them (7 per code)"
    ka, kb = bucket_keys(a, pairs), bucket_keys(b, pairs)
    assert (ka == kb).any(axis=0).all()  # every pair within radius 6 shares a bucket
    # A random code shares a pair bucket with another far less often than a single-substring one.
    single = key_scheme(64, 6)
    c = rng.integers(0, 256, (3000, 8), dtype=np.uint8)
    shared = lambda sch: (bucket_keys(a, sch)[:, :, None] == bucket_keys(c, sch)[:, None, :]).any(axis=0).mean()
    assert shared(pairs) < shared(single) / 10


# -- pca_hash --------------------------------------------------------------------------------
@pytest.mark.parametrize("sample_size, grouping", [(100_000, "components"), (700, "star")])
def test_pca_hash_forms_fit_the_same_sample_and_agree(tmp_path, sample_size, grouping):
    planted = planted_groups(2500, 64, copy_noise=0.03, seed=3)
    table = pa.table({"pixels_descriptor": fixed_list(planted.x), **sizes(2500, 3)})
    single, parted = assert_same(
        both_forms(tmp_path, table, PcaHashStage, {"sample_size": sample_size, "grouping": grouping}, shard_rows=200, **SMALL)
    )
    assert parted["summary"]["explained_variance_ratio"] == single["summary"]["explained_variance_ratio"]


# -- copy_dedup / decontaminate ----------------------------------------------------------------
def chained_descriptors(n: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Planted copy groups plus a chain of descriptors, each at cosine ~0.8 to the next, whose
    ends are unrelated: a component that spans coarse lists."""
    planted = planted_groups(n, dim, seed=seed, topics=16)
    x = planted.x.copy()
    rng = np.random.default_rng(seed)
    chain = rng.choice(n, 40, replace=False)
    v = x[chain[0]]
    for c in chain[1:]:
        step = rng.standard_normal(dim).astype(np.float32)
        step -= (step @ v) * v
        v = 0.85 * v + np.sqrt(1 - 0.85**2) * step / np.linalg.norm(step)
        x[c] = v
    return x, chain


def primary_lists(run_dir, stage_name: str) -> dict[int, int]:
    from curation.partitioned.files import PartitionedDataset

    steps = run_dir / "stages" / f"01_{stage_name}" / "steps" / "assign"
    ds = PartitionedDataset(steps, "lists")
    out = {}
    for p in ds.partitions():
        for chunk in ds.chunks(int(p), [schema.UID, "primary"]):
            for u, prim in zip(chunk.column(schema.UID).to_pylist(), chunk.column("primary").to_pylist()):
                if prim:
                    out[u] = int(p)
    return out


def test_copy_dedup_star_grouping_forms_agree(tmp_path):
    x, chain = chained_descriptors(2000, 64, seed=7)
    table = pa.table({"sscd_descriptor": fixed_list(x), **sizes(2000, 7)})
    config = {"threshold": 0.6, "grouping": "star", "index": {"list_size": 300, "list_probe": 1000}}
    single, parted = assert_same(both_forms(tmp_path, table, CopyDedupStage, config, shard_rows=150, **SMALL))
    details = [json.loads(d) for d in parted_drops(tmp_path).column(schema.DROP_DETAILS).to_pylist()]
    assert all(d["similarity"] > 0.6 for d in details)  # every drop passes against its own kept image


def test_copy_dedup_with_every_list_probed_agrees_and_finds_components_across_lists(tmp_path):
    x, chain = chained_descriptors(2000, 64, seed=4)
    table = pa.table({"sscd_descriptor": fixed_list(x), **sizes(2000, 4)})
    exact = {"threshold": 0.6, "index": {"list_size": 300, "list_probe": 1000}}
    single, parted = assert_same(both_forms(tmp_path, table, CopyDedupStage, exact, shard_rows=150, **SMALL))
    s = parted["summary"]
    assert s["index"]["lists"] > 3 and s["index"]["exact"] and s["recall_at_64"] == 1.0
    lists = primary_lists(tmp_path / "partitioned", "copy_dedup")
    uid = lambda row: (row // 150 << schema.UID_SHARD_BITS) | (row % 150)  # noqa: E731
    assert len({lists[uid(int(c))] for c in chain}) > 1  # the chain spans lists ...
    dropped = set(pa.concat_tables([parted_drops(tmp_path)]).column(schema.UID).to_pylist())
    assert sum(uid(int(c)) in dropped for c in chain) == len(chain) - 1  # ... and is one component


def parted_drops(tmp_path):
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "partitioned" / "stages" / "01_copy_dedup" / "drops").glob("*.parquet"))])


def test_copy_dedup_with_few_probes_measures_its_recall(tmp_path):
    planted = planted_groups(3000, 64, seed=5, topics=8)
    table = pa.table({"sscd_descriptor": fixed_list(planted.x), **sizes(3000, 5)})
    approx = {"index": {"list_size": 250, "list_probe": 1, "recall_queries": 300}}
    (_, d1, _), (parted, d2, _) = both_forms(tmp_path, table, CopyDedupStage, approx, shard_rows=300, **SMALL)
    s = parted["summary"]
    assert not s["index"]["exact"] and 0 < s["recall_at_64"] < 1 and s["recall_queries"] > 200
    # An approximate graph misses some copies (these descriptors are mostly noise, so a copy's
    # nearest coarse list is often not its original's); what it finds is recorded truthfully.
    assert 0.9 * d1.num_rows <= d2.num_rows <= d1.num_rows


def test_a_probe_margin_searches_boundary_vectors_in_more_lists_and_the_rest_in_fewer():
    from curation.index_settings import IndexSettings

    sims = np.array([[0.9, 0.85, 0.84, 0.5], [0.9, 0.5, 0.4, 0.3], [0.6, 0.59, 0.58, 0.57]], np.float32)
    margin = IndexSettings(list_probe=3, list_probe_margin=0.06, list_probe_min=1).probed(sims)
    assert margin.tolist() == [[True, True, True, False], [True, False, False, False], [True, True, True, False]]
    assert IndexSettings(list_probe=2).probed(sims).sum(axis=1).tolist() == [2, 2, 2]  # no margin: fixed
    assert IndexSettings(list_probe=3, list_probe_margin=0.0, list_probe_min=2).probed(sims)[1].tolist() == [True, True, False, False]
    assert IndexSettings(list_probe=8, list_probe_margin=2.0).probes_every_list(8)
    assert not IndexSettings(list_probe=8, list_probe_margin=0.1, list_probe_min=2).probes_every_list(8)
    with pytest.raises(ValueError, match="list_probe_min"):
        IndexSettings(list_probe=2, list_probe_min=3)


def test_copy_dedup_with_a_probe_margin_finds_more_copies_than_its_fewest_probes_would(tmp_path):
    planted = planted_groups(3000, 64, seed=5, topics=8)
    table = pa.table({"sscd_descriptor": fixed_list(planted.x), **sizes(3000, 5)})
    fixed = {"index": {"list_size": 250, "list_probe": 1, "recall_queries": 300}}
    margin = {"index": {"list_size": 250, "list_probe": 12, "list_probe_margin": 0.1, "recall_queries": 300}}
    (_, d_single, _), (few, d_few, _) = both_forms(tmp_path / "fixed", table, CopyDedupStage, fixed, shard_rows=300, **SMALL)
    _, (near, d_near, _) = both_forms(tmp_path / "margin", table, CopyDedupStage, margin, shard_rows=300, **SMALL)
    searched = near["summary"]["index"]["lists_searched_per_vector"]
    assert few["summary"]["index"]["lists_searched_per_vector"] == 1.0 and 1.0 < searched < 12
    assert near["summary"]["index"]["list_probe_margin"] == 0.1 and not near["summary"]["index"]["exact"]
    assert near["summary"]["recall_at_64"] > few["summary"]["recall_at_64"]
    assert d_few.num_rows < d_near.num_rows <= d_single.num_rows


def test_copy_dedup_with_a_margin_covering_every_list_is_exact_and_agrees(tmp_path):
    x, chain = chained_descriptors(2000, 64, seed=4)
    table = pa.table({"sscd_descriptor": fixed_list(x), **sizes(2000, 4)})
    config = {"threshold": 0.6, "index": {"list_size": 300, "list_probe": 1000, "list_probe_margin": 2.0}}
    single, parted = assert_same(both_forms(tmp_path, table, CopyDedupStage, config, shard_rows=150, **SMALL))
    assert parted["summary"]["index"]["exact"] and parted["summary"]["recall_at_64"] == 1.0


def test_decontamination_across_partitions_agrees(tmp_path):
    x, chain = chained_descriptors(2000, 64, seed=6)
    roles = np.full(2000, schema.POOL, object)
    roles[chain[0]] = schema.EXCLUDE  # an evaluation image at one end of the chain
    roles[np.random.default_rng(6).choice(2000, 30, replace=False)] = schema.EXCLUDE
    table = pa.table({"sscd_descriptor": fixed_list(x), "role": pa.array(roles.tolist()), **sizes(2000, 6)})
    config = {"threshold": 0.6, "index": {"list_size": 300, "list_probe": 1000}}
    single, parted = assert_same(both_forms(tmp_path, table, DecontaminateStage, config, shard_rows=150, **SMALL))
    assert parted["summary"]["contaminated_components"] == single["summary"]["contaminated_components"]
    drops = {u: json.loads(d) for u, d in zip(*(parted_stage_drops(tmp_path, "decontaminate").column(c).to_pylist() for c in (schema.UID, schema.DROP_DETAILS)))}
    uid = lambda row: (row // 150 << schema.UID_SHARD_BITS) | (row % 150)  # noqa: E731
    far_end = uid(int(chain[-1]))
    assert float(x[chain[-1]] @ x[chain[0]]) < 0.6  # unrelated to the evaluation image itself ...
    assert far_end in drops  # ... and dropped all the same, through the whole chain


def parted_stage_drops(tmp_path, name):
    import pyarrow.parquet as pq

    return pa.concat_tables([pq.read_table(f) for f in sorted((tmp_path / "partitioned" / "stages" / f"01_{name}" / "drops").glob("*.parquet"))])


# -- roles -----------------------------------------------------------------------------------
def test_stages_see_only_the_rows_of_their_roles_in_both_forms(tmp_path):
    x = np.tile(np.eye(1, 16, dtype=np.float32), (6, 1))  # six identical descriptors
    roles = [schema.SEED, schema.POOL, schema.EXCLUDE, schema.POOL, schema.SEED, schema.POOL]
    table = pa.table({"sscd_descriptor": fixed_list(x, pa.float32()), "role": pa.array(roles), **sizes(6)})
    (single, d1, _), (parted, d2, _) = both_forms(tmp_path, table, CopyDedupStage, {}, shard_rows=2, max_partition_rows=2, map_task_rows=2)
    assert d1.equals(d2) and d1.num_rows == 2  # two of the three pool copies; seeds, evals untouched
    assert single["applies_to"] == parted["applies_to"] == 3


def chain_table(n: int, seed: int = 8) -> pa.Table:
    rng = np.random.default_rng(seed)
    h = np.bitwise_xor.accumulate(np.uint64(1) << rng.integers(0, 64, n).astype(np.uint64))  # one-bit steps
    return pa.table({"phash": pa.array(h, pa.uint64()), **sizes(n, seed)})


def test_a_long_chain_is_one_component_and_star_groups_agree(tmp_path):
    single, parted = assert_same(
        both_forms(tmp_path, chain_table(8_000), PhashDedupStage, {"radius": 3, "flip": False, "grouping": "star"}, shard_rows=500,
                   max_partition_rows=1000, map_task_rows=2000)
    )
    assert parted["summary"]["dropped"] > 4_000 and any(s["step"].startswith("components.r") for s in parted["steps"])


@pytest.mark.slow
def test_a_chain_of_100k_images_under_star_in_bounded_chunks(tmp_path):
    single, parted = assert_same(
        both_forms(tmp_path, chain_table(100_000), PhashDedupStage, {"radius": 3, "flip": False, "grouping": "star"}, shard_rows=5000,
                   max_partition_rows=10_000, map_task_rows=20_000)
    )
    keep = next(s for s in parted["steps"] if s["step"] == "keep")
    assert keep["tasks"] >= 1 and parted["summary"]["largest_group"] < 100
