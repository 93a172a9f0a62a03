"""Cluster retrieval, partitioned by cluster: k-means on a sample, assignment as a map step.

The single-task rule (``retrieval.cluster.cluster_retrieval``) takes, from every cluster holding
more than ``min_seeds`` of a dataset's seeds, its ``per_cluster`` images closest to the centroid;
under ``cap`` it serves the clusters round-robin by rank, most-seeded clusters first within a
round. That order only needs each selected cluster's size and seed count, so ``quota`` turns it
into a number of images per cluster from the (cluster, dataset) counts alone, and each cluster
partition then takes its clusters' closest images. The result equals the single-task selection
for the same centroids and labels.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from curation import schema
from curation.partitioned.files import with_partition
from curation.partitioned.steps import AggregateStep, Artifact, MapStep, Output, ReduceStep, TaskContext
from retrieval.cluster import balanced_limits, cluster_params, fit_hierarchy, rank_in_cluster
from retrieval.hierarchical_kmeans import kmeans_with_resampling, pick_rank
from retrieval.kmeans import assign, kmeans

_CLUSTER_SALT = 0x5A4


def quota(sizes: np.ndarray, seeds_per_cluster: np.ndarray, selected: np.ndarray, per_cluster: int, cap: int) -> tuple[np.ndarray, bool]:
    """Images each ``selected`` cluster gives: min(size, per_cluster), or under ``cap`` the
    cluster's share of the order (rank, most seeds first, cluster id)."""
    take = np.minimum(sizes[selected], per_cluster).astype(np.int64)
    if take.sum() <= cap:
        return take, False

    def before(r: int) -> int:  # images of rank < r
        return int(np.minimum(take, r).sum())

    lo, hi = 0, int(take.max())  # the largest r with before(r) <= cap
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if before(mid) <= cap else (lo, mid - 1)
    limit = np.minimum(take, lo)
    extra = cap - before(lo)
    at_rank = np.flatnonzero(take > lo)
    order = np.lexsort((selected[at_rank], -seeds_per_cluster[selected[at_rank]]))
    limit[at_rank[order[:extra]]] += 1
    return limit, True


def parents_of(ctx: TaskContext) -> list[np.ndarray]:
    """The hierarchy's parent arrays, from the k-means artifact."""
    arrays = ctx.artifacts("kmeans").arrays
    return [arrays[f"parent{j}"] for j in range(sum(1 for key in arrays if key.startswith("parent")))]


def cluster_steps(stage, recipes, cluster_sets, n_pool, n_seeds, clusters_of, pool_rows, seed_rows, links_table) -> list:
    cfg, seed_value = stage.config, stage.context.seed
    c = cfg.clustering
    emb = cfg.embedding
    wanted = [(i, name, r) for i, (name, r) in enumerate(recipes) if r["method"] == "cluster"]

    def train(inputs, ctx: TaskContext) -> Artifact:
        from curation.retrieve.steps import VEC, _matrix

        t0 = time.perf_counter()
        t = inputs["split/train"].read()
        if t is None:  # no pool image has an embedding
            return Artifact(facts={"clusters": 0, "rule": "empty pool", "resampling_steps": c.resampling_steps, "train_rows": 0, "seconds": 0.0})
        t = t.sort_by(schema.UID)
        xt = _matrix(t.column(VEC))
        params = clusters_of(ctx.state)
        k = min(params.clusters, len(xt))
        if c.resampling_steps:
            centroids, _, _ = kmeans_with_resampling(xt, k, resampling_steps=c.resampling_steps, sample_size=c.resample_size,
                                                     niter=c.niter, seed=seed_value, spherical=True, gpu=cfg.index.gpu)
        else:
            centroids = kmeans(xt, k, niter=c.niter, seed=seed_value, spherical=True, gpu=cfg.index.gpu,
                               max_points_per_centroid=c.max_points_per_centroid).centroids
        levels, parents = fit_hierarchy(centroids, c.hierarchy.levels, clusters_configured=c.clusters, resampling_steps=c.hierarchy.resampling_steps,
                                        resample_size=c.hierarchy.resample_size, niter=c.niter, seed=seed_value, gpu=cfg.index.gpu)
        facts = {"clusters": int(k), "rule": params.rule.split(";")[0], "resampling_steps": c.resampling_steps,
                 "levels": [int(k)] + levels, "train_rows": int(len(xt)), "seconds": round(time.perf_counter() - t0, 3)}
        arrays = {"centroids": np.asarray(centroids, np.float32), **{f"parent{j}": p for j, p in enumerate(parents)}}
        return Artifact(arrays, facts)

    def assign_map(table: pa.Table, ctx: TaskContext) -> dict:
        from curation.retrieve.steps import VEC, _vec_column, _vectors

        rows = np.sort(np.concatenate([pool_rows(table), seed_rows(table, cluster_sets)]))
        if len(rows) == 0 or "centroids" not in ctx.artifacts("kmeans").arrays:
            return {}
        t0 = time.perf_counter()
        x = _vectors(table, emb, rows)
        labels, scores = assign(x, ctx.artifacts("kmeans").arrays["centroids"], True, cfg.index.gpu)
        ctx.count("assign_seconds", time.perf_counter() - t0)
        sub = table.take(pa.array(rows, pa.int64()))
        is_seed = np.asarray(sub.column(schema.ROLE).to_pylist()) == schema.SEED
        members = pa.table({
            schema.UID: sub.column(schema.UID),
            "seed": pa.array(is_seed),
            "dataset": sub.column(schema.SEED_DATASET),
            schema.ID: sub.column(schema.ID),
            "label": pa.array(labels, pa.int64()),
            "score": pa.array(np.asarray(scores, np.float32), pa.float32()),
            VEC: _vec_column(x),
        })
        return {"members": with_partition(members, ctx.hash_partitions(labels, "members", _CLUSTER_SALT))}

    def tally(part, ctx: TaskContext) -> dict:
        t = part.read(["seed", "dataset", "label"])
        label = t.column("label").to_numpy()
        seed = t.column("seed").to_numpy(zero_copy_only=False)
        ds = np.asarray(t.column("dataset").to_pylist(), object)
        keys, counts, names = [], [], []
        for d, rows in [(None, ~seed)] + [(d, seed & (ds == d)) for d in cluster_sets]:
            cl, n = np.unique(label[rows], return_counts=True)
            keys.append(cl)
            counts.append(n)
            names += [d] * len(cl)
        out = pa.table({"cluster": np.concatenate(keys).astype(np.int64), "dataset": pa.array(names, pa.string()),
                        "n": np.concatenate(counts).astype(np.int64)})
        return {"counts": with_partition(out, 0)}

    def quotas(inputs, ctx: TaskContext) -> Artifact:
        C = int(ctx.state.facts["kmeans"]["clusters"])
        t = inputs["tally/counts"].read()
        if t is None:
            t = pa.table({"cluster": pa.array([], pa.int64()), "dataset": pa.array([], pa.string()), "n": pa.array([], pa.int64())})
        cl = t.column("cluster").to_numpy()
        ds = np.asarray(t.column("dataset").to_pylist(), object)
        n = t.column("n").to_numpy()
        is_pool = np.array([d is None for d in ds], bool)
        sizes = np.bincount(cl[is_pool], weights=n[is_pool], minlength=C).astype(np.int64)
        arrays, facts = {}, {}
        for i, name, r in wanted:
            spc = np.bincount(cl[ds == name], weights=n[ds == name], minlength=C).astype(np.int64)
            min_seeds, cap = int(r.get("min_seeds", 3)), int(r.get("cap", 1_000_000))
            params = cluster_params(n_pool(ctx.state), int(r.get("per_cluster", 10_000)), c.clusters, c.points_per_cluster)
            balanced = {}
            if r.get("sampling") == "balanced":
                selected, limit, capped, balanced = balanced_limits(sizes, spc, parents_of(ctx), min_seeds=min_seeds, per_cluster=params.per_cluster,
                                                                    cap=cap, seed=seed_value, dataset=name, pick=r.get("pick", "random"))
            else:
                selected = np.flatnonzero(spc > min_seeds)
                limit, capped = quota(sizes, spc, selected, params.per_cluster, cap)
            arrays[f"r{i}_clusters"], arrays[f"r{i}_limits"] = selected.astype(np.int64), limit
            facts[f"r{i}"] = {"method": "cluster", "min_seeds": min_seeds, "per_cluster": params.per_cluster, "cap": cap,
                              "clusters_selected": int(len(selected)), "capped": bool(capped), "rule": params.rule, **balanced}
        return Artifact(arrays, facts)

    def select(part, ctx: TaskContext) -> dict:
        from curation.retrieve.steps import VEC, _matrix

        t = part.read().sort_by(schema.UID)
        uid = t.column(schema.UID).to_numpy()
        seed = t.column("seed").to_numpy(zero_copy_only=False)
        ds = np.asarray(t.column("dataset").to_pylist(), object)
        ids = np.asarray(t.column(schema.ID).to_pylist(), object)
        label = t.column("label").to_numpy()
        x = _matrix(t.column(VEC))
        pool = np.flatnonzero(~seed)
        score = t.column("score").to_numpy()
        ranks = {"closest": rank_in_cluster(label[pool], score[pool])}  # ties: smaller uid first (rows sorted by uid)
        art = ctx.artifacts("quota")
        m = cfg.max_seed_links
        out = []
        for i, name, r in wanted:
            order = r.get("pick", "random") if r.get("sampling") == "balanced" else "closest"
            if order not in ranks:
                ranks[order] = pick_rank(label[pool], uid[pool], score[pool], order, seed_value)
            rank = np.full(len(uid), -1, np.int64)
            rank[pool] = ranks[order]
            selected, limits = art.arrays[f"r{i}_clusters"], art.arrays[f"r{i}_limits"]
            here = np.isin(selected, np.unique(label[pool]))
            for cl, lim in zip(selected[here], limits[here]):
                p = pool[(label[pool] == cl) & (rank[pool] < lim)]
                s = np.flatnonzero(seed & (ds == name) & (label == cl))
                sims = x[p] @ x[s].T
                top = np.argsort(-sims, axis=1, kind="stable")[:, :m]
                pp, ss = np.repeat(p, top.shape[1]), s[top].reshape(-1)
                ctx.count(f"retrieved:r{i}", len(p))
                out.append(links_table(uid[pp], uid[ss], ids[ss], np.take_along_axis(sims, top, 1).reshape(-1), "cluster", name, cl, i, ctx))
        ctx.peak("partition_rows", len(uid))
        return {"links": pa.concat_tables(out)} if out else {}

    return [
        AggregateStep("kmeans", ["split/train"], train),
        MapStep("assign", assign_map, [Output("members", lambda s: s.partitions_for(n_pool(s) + n_seeds(s, cluster_sets)))],
                columns=(schema.ID, schema.SEED_DATASET, emb)),
        ReduceStep("tally", "assign/members", tally, [Output("counts", 1)]),
        AggregateStep("quota", ["tally/counts"], quotas),
        ReduceStep("select", "assign/members", select, [Output("links", lambda s: s.n_groups)]),
    ]
