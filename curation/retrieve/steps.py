"""The partitioned form of ``retrieve``: neither the pool nor the seeds are ever held in one task.

    census (map + aggregate: pool images with an embedding, seed images per dataset)
    split (map: pool vectors into index shards by uid hash; sample-recipe seeds into query
           batches; a bounded k-means training sample of the pool)
  sample retrieval:
    search (cross: one index shard x one query batch; each seed's top k in that shard)
    merge (reduce per query batch: each seed's top k over every shard, then each recipe's k and
           min_similarity; the links, keyed by the pool image's group)
    recall (aggregate: recall@k of sampled seeds against exact search, when the index is not exact)
  cluster retrieval:
    kmeans (aggregate: faiss k-means, or Vo et al.'s resampling, on the sample)
    assign (map: every pool image and cluster-recipe seed to its nearest centroid)
    tally (reduce per cluster partition: pool images and seeds per dataset in each cluster)
    quota (aggregate: the clusters each recipe selects, and per cluster how many images it gives
           under the recipe's cap, by the single-task rule: round-robin by rank, most seeded first)
    select (reduce per cluster partition: each selected cluster's closest images within quota,
            with their seed links)
    provenance (map per group, joined with both link datasets: drops and annotations)

Sample retrieval merges every shard's top k by (similarity, then smallest pool uid), so with an
exact index per shard it equals the single-task search. Cluster retrieval differs from the single
task only in where the centroids come from (a sample of ``max_points_per_centroid`` points per
centroid, as faiss itself samples) and in the labels (every row assigned by the map step).

Memory per task: an index shard and one chunk of queries (``max_partition_rows`` each); a merge
holds one query batch's running top k; a cluster partition holds about ``max_partition_rows``
rows (a single cluster larger than that is one task); the quota step holds C x datasets counts;
k-means holds its sample (C x ``max_points_per_centroid`` vectors) and C centroids.
"""

from __future__ import annotations

import time

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.partitioned.files import with_partition
from curation.partitioned.keys import sample_rate, sampled
from curation.partitioned.steps import ANNOTATIONS, DROPS, AggregateStep, Artifact, CrossStep, MapStep, Output, ReduceStep, TaskContext
from curation.stage import empty_drops, make_drops
from retrieval.cluster import cluster_params
from retrieval.provenance import provenance

_POOL_SALT, _QUERY_SALT, _TRAIN_SALT, _CLUSTER_SALT, _RECALL_SALT = 0x5A1, 0x5A2, 0x5A3, 0x5A4, 0x5A5
VEC = "x"
LINK_COLUMNS = ("pool", "seed", "seed_id", "sim", "method", "dataset", "cluster", "recipe")


def recipes_of(seeds: dict) -> list[tuple[str, dict]]:
    """(dataset, recipe) of every sample and cluster recipe, in the order the single task runs them."""
    return [(name, r) for name in sorted(seeds) for r in (seeds[name].get("recipes") or []) if r.get("method") in ("sample", "cluster")]


def _vectors(table: pa.Table, column: str, rows: np.ndarray) -> np.ndarray:
    from curation.stages.retrieve import embedding_matrix

    return embedding_matrix(table.column(column).take(pa.array(rows, pa.int64())))


def _vec_column(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(x, np.float32).reshape(-1), pa.float32()), x.shape[1])


def _matrix(col) -> np.ndarray:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    return arr.flatten().to_numpy(zero_copy_only=False).astype(np.float32).reshape(len(arr), -1)


def _links(pool, seed, seed_id, sim, method: str, dataset: str, cluster, recipe: int, ctx: TaskContext) -> pa.Table:
    n = len(pool)
    t = pa.table(
        {
            "pool": pa.array(pool, pa.int64()),
            "seed": pa.array(seed, pa.int64()),
            "seed_id": pa.array(seed_id, pa.string()),
            "sim": pa.array(np.asarray(sim, np.float32), pa.float32()),
            "method": pa.array([method] * n, pa.string()),
            "dataset": pa.array([dataset] * n, pa.string()),
            "cluster": pa.array(np.broadcast_to(np.asarray(cluster, np.int64), (n,)), pa.int64()),
            "recipe": pa.array(np.full(n, recipe, np.int32), pa.int32()),
        }
    )
    return with_partition(t, ctx.groups_of_uids(pool) if n else np.zeros(0, np.int64))


def _topk(q, nbr, sim, k_of):
    """Per query, its best ``k_of[q]`` (similarity descending, then smallest neighbour uid)."""
    order = np.lexsort((nbr, -sim, q))
    q, nbr, sim = q[order], nbr[order], sim[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, np.int64)
    rank = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)]))
    keep = rank < k_of(q)
    return q[keep], nbr[keep], sim[keep]


def retrieve_steps(stage) -> list:
    cfg, seeds, seed_value = stage.config, stage.context.seeds, stage.context.seed
    emb = cfg.embedding
    recipes = recipes_of(seeds)
    sample_sets = sorted({name for name, r in recipes if r["method"] == "sample"})
    cluster_sets = sorted({name for name, r in recipes if r["method"] == "cluster"})
    k_max = {name: max(int(r.get("k", 4)) for n2, r in recipes if n2 == name and r["method"] == "sample") for name in sample_sets}
    names = sorted(seeds)

    def seed_rows(table: pa.Table, datasets) -> np.ndarray:
        role = table.column(schema.ROLE)
        ok = pc.and_(pc.equal(role, schema.SEED), pc.is_valid(table.column(emb)))
        ok = pc.and_(ok, pc.is_in(table.column(schema.SEED_DATASET), value_set=pa.array(list(datasets), pa.string())))
        return np.flatnonzero(ok.to_numpy(zero_copy_only=False))

    def pool_rows(table: pa.Table) -> np.ndarray:
        ok = pc.and_(pc.equal(table.column(schema.ROLE), schema.POOL), pc.is_valid(table.column(emb)))
        return np.flatnonzero(ok.to_numpy(zero_copy_only=False))

    def n_pool(state) -> int:
        return int(state.facts["census"]["pool"])

    def n_seeds(state, datasets) -> int:
        return int(sum(state.facts["census"]["seeds"].get(d, 0) for d in datasets))

    def clusters_of(state):
        c = cfg.clustering
        return cluster_params(n_pool(state), per_cluster=1, clusters=c.clusters, points_per_cluster=c.points_per_cluster)

    # -- census and split ------------------------------------------------------------------
    def census_map(table: pa.Table, ctx: TaskContext) -> dict:
        role = table.column(schema.ROLE).to_numpy(zero_copy_only=False)
        valid = pc.is_valid(table.column(emb)).to_numpy(zero_copy_only=False)
        ds = table.column(schema.SEED_DATASET).to_numpy(zero_copy_only=False)
        keys = ["pool"] + [f"seed:{d}" for d in names]
        counts = [int(np.sum((role == schema.POOL) & valid))] + [int(np.sum((role == schema.SEED) & valid & (ds == d))) for d in names]
        return {"counts": with_partition(pa.table({"key": keys, "n": pa.array(counts, pa.int64())}), 0)}

    def census(inputs, ctx: TaskContext) -> Artifact:
        t = inputs["census_map/counts"].read()
        totals: dict[str, int] = {}
        if t is not None:
            for key, n in zip(t.column("key").to_pylist(), t.column("n").to_pylist()):
                totals[key] = totals.get(key, 0) + int(n)
        return Artifact(facts={"pool": totals.get("pool", 0), "seeds": {d: totals.get(f"seed:{d}", 0) for d in names}})

    def split(table: pa.Table, ctx: TaskContext) -> dict:
        uids = table.column(schema.UID).to_numpy()
        out = {}
        p_rows = pool_rows(table)
        if sample_sets and len(p_rows):
            out["pool"] = with_partition(
                pa.table({schema.UID: pa.array(uids[p_rows], pa.int64()), VEC: _vec_column(_vectors(table, emb, p_rows))}),
                ctx.hash_partitions(uids[p_rows], "pool", _POOL_SALT),
            )
        s_rows = seed_rows(table, sample_sets)
        if len(s_rows):
            q = table.take(pa.array(s_rows, pa.int64()))
            out["queries"] = with_partition(
                pa.table({schema.UID: q.column(schema.UID), schema.ID: q.column(schema.ID), "dataset": q.column(schema.SEED_DATASET),
                          VEC: _vec_column(_vectors(table, emb, s_rows))}),
                ctx.hash_partitions(uids[s_rows], "queries", _QUERY_SALT),
            )
        if cluster_sets and len(p_rows):
            c = cfg.clustering
            want = clusters_of(ctx.state).clusters * c.max_points_per_centroid
            pick = p_rows[sampled(uids[p_rows], sample_rate(want, n_pool(ctx.state)), seed_value ^ _TRAIN_SALT)]
            if len(pick):
                out["train"] = with_partition(pa.table({schema.UID: pa.array(uids[pick], pa.int64()), VEC: _vec_column(_vectors(table, emb, pick))}), 0)
        return out

    steps: list = [
        MapStep("census_map", census_map, [Output("counts", 1)], columns=(schema.SEED_DATASET, emb)),
        AggregateStep("census", ["census_map/counts"], census),
    ]
    if sample_sets or cluster_sets:
        steps.append(MapStep("split", split, [
            Output("pool", lambda s: s.partitions_for(n_pool(s))),
            Output("queries", lambda s: s.partitions_for(n_seeds(s, sample_sets))),
            Output("train", 1),
        ], columns=(schema.ID, schema.SEED_DATASET, emb)))

    # -- sample retrieval ------------------------------------------------------------------
    def search(shard, batch, ctx: TaskContext) -> dict:
        t0 = time.perf_counter()
        db_t = shard.read([schema.UID, VEC])
        db_uids, db = db_t.column(schema.UID).to_numpy(), _matrix(db_t.column(VEC))
        index = cfg.index.make_index(db.shape[1], seed_value).add(db)
        rate = sample_rate(cfg.index.recall_queries, n_seeds(ctx.state, sample_sets))
        out: dict[str, list] = {"candidates": [], "exact": [], "approx": []}
        for chunk in batch.chunks([schema.UID, "dataset", VEC]):
            q_uids = chunk.column(schema.UID).to_numpy()
            k_row = np.array([k_max[d] for d in chunk.column("dataset").to_pylist()], np.int64)
            qx = _matrix(chunk.column(VEC))
            k = int(min(k_row.max(), len(db_uids)))
            sims, ids = index.search(qx, k)
            cand = _flatten(q_uids, db_uids, sims, ids, k_row)
            out["candidates"].append(cand)
            is_rq = sampled(q_uids, rate, seed_value ^ _RECALL_SALT)
            if not index.exact and is_rq.any():
                flat = faiss.IndexFlatIP(db.shape[1])
                flat.add(db)
                es, ei = flat.search(qx[is_rq], k)
                out["exact"].append(_flatten(q_uids[is_rq], db_uids, es, ei, k_row[is_rq]))
                out["approx"].append(_flatten(q_uids[is_rq], db_uids, sims[is_rq], ids[is_rq], k_row[is_rq]))
        ctx.count("search_seconds", time.perf_counter() - t0)
        ctx.count("approximate_shards", 0 if index.exact else 1)
        ctx.peak("shard_rows", len(db_uids))
        ctx.peak("batch_rows", batch.rows)
        res = {}
        for name, parts in out.items():
            if parts:
                q, nbr, sim = map(np.concatenate, zip(*parts))
                res[name] = with_partition(pa.table({"q": q, "nbr": nbr, "sim": sim}), batch.partition if name == "candidates" else 0)
        return res

    def merge(part, ctx: TaskContext) -> dict:
        queries = ctx.side.read([schema.UID, schema.ID, "dataset"])
        q_uid = queries.column(schema.UID).to_numpy()
        order = np.argsort(q_uid)
        q_uid = q_uid[order]
        q_id = np.asarray(queries.column(schema.ID).to_pylist(), object)[order]
        q_ds = np.asarray(queries.column("dataset").to_pylist(), object)[order]
        q_k = np.array([k_max[d] for d in q_ds], np.int64)

        def k_of(q):
            return q_k[np.searchsorted(q_uid, q)]

        best = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
        for chunk in part.chunks(["q", "nbr", "sim"]):  # a running top k: memory is one batch's k, not k x shards
            q = np.concatenate([best[0], chunk.column("q").to_numpy()])
            nbr = np.concatenate([best[1], chunk.column("nbr").to_numpy()])
            sim = np.concatenate([best[2], chunk.column("sim").to_numpy()])
            best = _topk(q, nbr, sim, k_of)
        q, nbr, sim = best
        pos = np.searchsorted(q_uid, q)
        links = []
        for r, (name, recipe) in enumerate(recipes):
            if recipe["method"] != "sample":
                continue
            k, min_sim = int(recipe.get("k", 4)), recipe.get("min_similarity")
            qq, nn, ss = _topk(q[q_ds[pos] == name], nbr[q_ds[pos] == name], sim[q_ds[pos] == name], lambda x: np.full(len(x), k))
            if min_sim is not None:
                ok = ss >= min_sim
                qq, nn, ss = qq[ok], nn[ok], ss[ok]
            ctx.count(f"retrieved:r{r}", len(qq))
            links.append(_links(nn, qq, q_id[np.searchsorted(q_uid, qq)], ss, "sample", name, -1, r, ctx))
        return {"links": pa.concat_tables(links)} if links else {}

    def recall(inputs, ctx: TaskContext) -> Artifact:
        # Each shard gave its exact and its approximate top k of the sampled seeds; the best
        # k_max of each union per seed compares like with like.
        kk = max(k_max.values())

        def pairs(ref):
            t = inputs[ref].read(["q", "nbr", "sim"])
            if t is None:
                return set(), 0
            q, nbr, _ = _topk(t.column("q").to_numpy(), t.column("nbr").to_numpy(), t.column("sim").to_numpy(), lambda x: np.full(len(x), kk))
            return set(zip(q.tolist(), nbr.tolist())), len(np.unique(q))

        exact, n = pairs("search/exact")
        found, _ = pairs("search/approx")
        if not exact:
            return Artifact(facts={"recall": None, "queries": 0})
        return Artifact(facts={"recall": round(len(exact & found) / len(exact), 4), "queries": n, "k": kk})

    if sample_sets:
        steps += [
            CrossStep("search", "split/pool", "split/queries", search,
                      [Output("candidates", lambda s: s.partitions_for(n_seeds(s, sample_sets))), Output("exact", 1), Output("approx", 1)]),
            ReduceStep("merge", "search/candidates", merge, [Output("links", lambda s: s.n_groups)], side_input="split/queries"),
            AggregateStep("recall", ["search/exact", "search/approx"], recall),
        ]

    # -- cluster retrieval -----------------------------------------------------------------
    if cluster_sets:
        from curation.retrieve.clusters import cluster_steps

        steps += cluster_steps(stage, recipes, cluster_sets, n_pool, n_seeds, clusters_of, pool_rows, seed_rows, _links)

    # -- provenance ------------------------------------------------------------------------
    link_refs = tuple(ref for ref, on in (("merge/links", bool(sample_sets)), ("select/links", bool(cluster_sets))) if on)

    def provenance_map(table: pa.Table, ctx: TaskContext) -> dict:
        uids = table.column(schema.UID).to_numpy()
        role = table.column(schema.ROLE).to_numpy(zero_copy_only=False)
        valid = pc.is_valid(table.column(emb)).to_numpy(zero_copy_only=False)
        pool = uids[(role == schema.POOL) & valid]
        missing = uids[(role == schema.POOL) & ~valid]
        ctx.count("pool_images", len(pool) + len(missing))
        if not seeds:
            n = len(pool)
            ann = stage._annotations(pool, ["pool"] * n, [None] * n, [None] * n, [None] * n, [None] * n)
            return {ANNOTATIONS: with_partition(ann, ctx.task)}
        parts = [t for t in (ctx.sides[ref].read(list(LINK_COLUMNS)) for ref in link_refs) if t is not None and t.num_rows]
        links = pa.concat_tables(parts) if parts else None
        if links is None:
            p = provenance([], [], [], [], [], [], [], cfg.max_seed_links)
        else:
            cols = {c: links.column(c).to_numpy(zero_copy_only=False) for c in LINK_COLUMNS}
            p = provenance(cols["pool"], cols["seed"], cols["seed_id"], cols["sim"], cols["method"], cols["dataset"], cols["cluster"], cfg.max_seed_links)
            for r in np.unique(cols["recipe"]):
                ctx.count(f"unique:r{int(r)}", len(np.unique(cols["pool"][cols["recipe"] == r])))
        for d, n in p.by_dataset.items():
            ctx.count(f"final:{d}", n)
        ctx.count("retrieved_unique", len(p.uid))
        ctx.count("shared_between_datasets", p.shared_between_datasets)
        dropped = np.sort(np.concatenate([pool[~np.isin(pool, p.uid)], missing]))
        ctx.count("not_retrieved", len(dropped))
        drops = make_drops(dropped, ["not_retrieved"] * len(dropped), [None] * len(dropped)) if len(dropped) else empty_drops()
        return {DROPS: with_partition(drops, ctx.task), ANNOTATIONS: with_partition(stage.annotations(p), ctx.task)}

    steps.append(MapStep("provenance", provenance_map, [Output(DROPS, lambda s: s.n_groups), Output(ANNOTATIONS, lambda s: s.n_groups)],
                         columns=(emb,), side_input=link_refs or None))
    return steps


def _flatten(q_uids, db_uids, sims, ids, k_row):
    """(query, pool, sim) of a search result: missing neighbours dropped, at most ``k_row`` per query."""
    ok = (ids >= 0) & (np.arange(ids.shape[1])[None, :] < k_row[:, None])
    q = np.broadcast_to(q_uids[:, None], ids.shape)[ok]
    return q.astype(np.int64), db_uids[np.maximum(ids, 0)][ok].astype(np.int64), sims[ok].astype(np.float32)


def summary(stage, counters: dict, facts: dict) -> dict:
    """The single-task summary's figures, from the steps' counters and facts."""
    seeds = stage.context.seeds
    prov = counters.get("provenance", {})
    out: dict = {"pool_images": int(prov.get("pool_images", 0))}
    if not seeds:
        out["skipped"] = "no seed datasets in this run: the pool is kept whole"
        return out
    census = facts.get("census", {"seeds": {}})
    merged = {**counters.get("merge", {}), **counters.get("select", {})}
    per_dataset: dict = {}
    idx = -1
    for name in sorted(seeds):
        info = {"seed_images": int(census["seeds"].get(name, 0)), "recipes": []}
        for r, recipe in enumerate(seeds[name].get("recipes") or []):
            m = recipe.get("method")
            if m == "as_is":
                info["recipes"].append({"method": "as_is", "images": info["seed_images"]})
                continue
            idx += 1  # the recipe's number in recipes_of (same order)
            got, unique = int(merged.get(f"retrieved:r{idx}", 0)), int(prov.get(f"unique:r{idx}", 0))
            if m == "sample":
                info["recipes"].append({"method": "sample", "k": int(recipe.get("k", 4)), "min_similarity": recipe.get("min_similarity"),
                                        "retrieved": got, "unique": unique, "collisions": got - unique})
            else:
                info["recipes"].append({**facts.get("quota", {}).get(f"r{idx}", {}), "retrieved": got, "unique": unique, "collisions": 0})
        info["retrieved"] = int(sum(x.get("retrieved", 0) for x in info["recipes"]))
        info["final"] = int(prov.get(f"final:{name}", 0))
        info["collisions"] = int(sum(x.get("collisions", 0) for x in info["recipes"]))
        per_dataset[name] = info
    out.update({
        "seed_datasets": per_dataset,
        "retrieved_unique": int(prov.get("retrieved_unique", 0)),
        "not_retrieved": int(prov.get("not_retrieved", 0)),
        "shared_between_datasets": int(prov.get("shared_between_datasets", 0)),
    })
    if "kmeans" in facts:
        out["pool_clustering"] = facts["kmeans"]
    if "search" in counters:
        s = counters["search"]
        out["sample_search"] = {
            "form": "sharded",
            "exact": not s.get("approximate_shards", 0),
            "per_shard_spec": stage.config.index.spec,
            "largest_shard": int(s.get("shard_rows_max", 0)),
            "largest_query_batch": int(s.get("batch_rows_max", 0)),
            "search_seconds": round(s.get("search_seconds", 0.0), 3),
            "recall": facts.get("recall", {}).get("recall"),
            "recall_queries": facts.get("recall", {}).get("queries"),
        }
    return out
