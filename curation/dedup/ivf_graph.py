"""The thresholded k-NN graph, partitioned like an IVF index: each coarse list is one task.

    sample (map) -> coarse quantizer (aggregate: faiss k-means on a bounded sample)
    -> assign (map: each vector to its ``list_probe`` nearest lists; exact partial top-k of the
       recall queries on the way)
    -> search (reduce per list: the list's own vectors are the database, every vector probing
       the list is a query; exact or a per-list index; top-k candidates above the threshold)
    -> merge (reduce per query: the top k over all lists, the edges)
    -> recall (aggregate: recall@k of the sampled queries against exact search)
    -> connected components

A vector is stored in one list (its nearest centroid) and searched in ``list_probe`` lists (or
those nearly as close as its nearest, ``list_probe_margin``), so with every list probed the
search is exact and the graph equals the single-task one. Why the merge may keep only
candidates above the threshold: an edge needs a neighbour in the global top k *and* above the
threshold; every such neighbour is in its list's top k and above the
threshold, and any candidate above the threshold that is not in the global top k is outranked by
k others that are all above the threshold too, so the top k of the candidates is exactly the
edges.

Memory per task: a map task holds its group; a search task holds at most
``max_partition_rows`` database vectors and one chunk of queries; a merge task holds its
partition's candidates; the quantizer holds ``train_points_per_list`` x lists vectors.
"""

from __future__ import annotations

import math
import time

import faiss
import numpy as np
import pyarrow as pa

from curation import schema
from curation.dedup.band import pair_requests
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.partitioned.components import edge_rows, star_forest
from curation.partitioned.files import with_partition
from curation.partitioned.keys import partition_of, sample_rate, sampled
from curation.partitioned.steps import AggregateStep, Artifact, ComponentsStep, MapStep, Output, ReduceStep, TaskContext
from retrieval.index import knn_search
from retrieval.kmeans import kmeans

_TRAIN_SALT, _QUERY_SALT = 0x7A1, 0x9E7
PRIMARY, VEC = "primary", "x"


def n_lists(n_rows: int, list_size: int) -> int:
    return max(1, math.ceil(n_rows / max(1, list_size)))


def _vectors(table: pa.Table, column: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(uids, L2-normalised float32 vectors, indices into ``table``) of rows with a descriptor."""
    x, valid = descriptor_matrix(table.column(column), column)
    idx = np.flatnonzero(valid)
    return table.column(schema.UID).to_numpy()[idx], normalize_rows(x[idx]), idx


def _vec_table(uids: np.ndarray, x: np.ndarray, **extra) -> pa.Table:
    flat = pa.array(np.ascontiguousarray(x, np.float32).reshape(-1), pa.float32())
    return pa.table({schema.UID: pa.array(uids, pa.int64()), **extra, VEC: pa.FixedSizeListArray.from_arrays(flat, x.shape[1])})


def _topk(q: np.ndarray, nbr: np.ndarray, sim: np.ndarray, k: int):
    """Per query, the k best (sim descending, then smallest neighbour uid)."""
    order = np.lexsort((nbr, -sim, q))
    q, nbr, sim = q[order], nbr[order], sim[order]
    starts = np.flatnonzero(np.r_[True, q[1:] != q[:-1]]) if len(q) else np.zeros(0, np.int64)
    rank = np.arange(len(q)) - np.repeat(starts, np.diff(np.r_[starts, len(q)]))
    keep = rank < k
    return q[keep], nbr[keep], sim[keep]


def _candidates(q_uids, db_uids, sims, ids, k: int, threshold: float | None):
    """Flatten a search result to (query, neighbour, sim), self and missing dropped, at most k per
    query, and (with a threshold) only candidates above it."""
    nbr = np.where(ids >= 0, db_uids[np.maximum(ids, 0)], -1)
    q = np.broadcast_to(q_uids[:, None], ids.shape)
    ok = (ids >= 0) & (nbr != q)
    ok &= np.cumsum(ok, axis=1) <= k
    if threshold is not None:
        ok &= sims > threshold
    return q[ok], nbr[ok], sims[ok]


def _triples(q, nbr, sim, partitions: int | None = None) -> pa.Table:
    t = pa.table({"q": pa.array(q, pa.int64()), "nbr": pa.array(nbr, pa.int64()), "sim": pa.array(sim, pa.float32())})
    return with_partition(t, 0 if partitions is None else partition_of(q, partitions, salt=0x0C))


def _read_triples(part) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    t = part.read(["q", "nbr", "sim"])
    if t is None:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    return t.column("q").to_numpy(), t.column("nbr").to_numpy(), t.column("sim").to_numpy()


def knn_graph_steps(descriptor: str, k: int, threshold: float, settings, seed: int, accept_above: float | None = None) -> list:
    """Steps from descriptors to ``components/labels`` (plus the recall facts). With
    ``accept_above`` (copy_dedup's ambiguous band), the merge writes ``merge/requests`` instead:
    pairs above it accepted, the others (above ``threshold``) to verify; the caller adds the
    verification and components steps."""

    def sample(table: pa.Table, ctx: TaskContext) -> dict:
        uids, x, _ = _vectors(table, descriptor)
        lists = n_lists(ctx.state.n_rows, settings.list_size)
        train = sampled(uids, sample_rate(settings.train_points_per_list * lists, ctx.state.n_rows), seed ^ _TRAIN_SALT)
        query = sampled(uids, sample_rate(settings.recall_queries, ctx.state.n_rows), seed ^ _QUERY_SALT)
        out = {"queries": with_partition(_vec_table(uids[query], x[query]), 0)}
        if lists > 1:
            out["train"] = with_partition(_vec_table(uids[train], x[train]), 0)
        return out

    def quantizer(inputs, ctx: TaskContext) -> Artifact:
        t0 = time.perf_counter()
        q = inputs["sample/queries"].read()
        arrays: dict[str, np.ndarray] = {}
        if q is not None:
            q = q.sort_by(schema.UID)
            arrays["query_uids"] = q.column(schema.UID).to_numpy()
            arrays["query_x"], _ = descriptor_matrix(q.column(VEC), VEC)
        train = inputs["sample/train"].read()
        lists = 1
        if train is not None and train.num_rows >= 2:
            train = train.sort_by(schema.UID)
            xt, _ = descriptor_matrix(train.column(VEC), VEC)
            lists = min(n_lists(ctx.state.n_rows, settings.list_size), len(xt))
            km = kmeans(xt, lists, niter=20, seed=seed, spherical=True, gpu=settings.gpu,
                        max_points_per_centroid=max(256, settings.train_points_per_list))
            arrays["centroids"] = km.centroids.astype(np.float32)
        facts = {"lists": lists, "train_rows": 0 if train is None else train.num_rows,
                 "recall_queries": int(len(arrays.get("query_uids", []))), "train_seconds": round(time.perf_counter() - t0, 3)}
        return Artifact(arrays, facts)

    def assign(table: pa.Table, ctx: TaskContext) -> dict:
        art = ctx.artifacts("quantizer")
        uids, x, idx = _vectors(table, descriptor)
        out = {}
        if len(uids) == 0:
            return out
        lists = art.facts["lists"]
        probe = min(settings.list_probe, lists)
        if lists > 1:
            sims, nearest = knn_search(art.arrays["centroids"], x, probe, spec="Flat", gpu=settings.gpu)
            searched = settings.probed(sims)
        else:
            nearest, searched = np.zeros((len(uids), 1), np.int64), np.ones((len(uids), 1), bool)
        rows = np.repeat(np.arange(len(uids)), searched.sum(axis=1))
        lst = nearest[searched]
        primary = np.broadcast_to(np.arange(nearest.shape[1]) == 0, nearest.shape)[searched]  # stored in its nearest list
        t = pa.table({schema.UID: pa.array(uids[rows], pa.int64()), PRIMARY: pa.array(primary), VEC: table.column(descriptor).take(pa.array(idx[rows]))})
        out["lists"] = with_partition(t, lst)
        ctx.count("vectors", len(uids))
        if "query_uids" in art.arrays:  # exact partial top-k of the recall queries in this group
            t0 = time.perf_counter()
            flat = faiss.IndexFlatIP(x.shape[1])
            flat.add(x)
            sims, ids = flat.search(art.arrays["query_x"], min(k + 1, len(uids)))
            ctx.count("exact_seconds", time.perf_counter() - t0)
            ctx.count("exact_pairs", len(uids) * len(art.arrays["query_uids"]))
            out["exact"] = _triples(*_candidates(art.arrays["query_uids"], uids, sims, ids, k, None))
        return out

    def search(part, ctx: TaskContext) -> dict:
        art = ctx.artifacts("quantizer")
        recall_q = art.arrays.get("query_uids", np.zeros(0, np.int64))
        t0 = time.perf_counter()
        cand, rec = [], []
        stored_total = 0
        for db_uids, db in _stored_chunks(part, descriptor, ctx.state.max_partition_rows):
            stored_total += len(db_uids)
            index = settings.make_index(db.shape[1], seed).add(db)
            for q_uids, qx in _query_chunks(part, descriptor):
                sims, ids = index.search(qx, min(k + 1, len(db_uids)))
                cand.append(_candidates(q_uids, db_uids, sims, ids, k, threshold))
                is_rq = np.isin(q_uids, recall_q)
                if is_rq.any():
                    rec.append(_candidates(q_uids[is_rq], db_uids, sims[is_rq], ids[is_rq], k, None))
            ctx.count("approximate_chunks", 0 if index.exact else 1)
        ctx.count("search_seconds", time.perf_counter() - t0)
        ctx.count("probes", part.rows)
        ctx.peak("list_rows", stored_total)
        out = {}
        if cand:
            out["candidates"] = _triples(*map(np.concatenate, zip(*cand)), ctx.partitions["candidates"])
        if rec:
            out["recall_ivf"] = _triples(*map(np.concatenate, zip(*rec)))
        return out

    def merge(part, ctx: TaskContext) -> dict:
        q, nbr, sim = _topk(*_read_triples(part), k)
        lo, hi = np.minimum(q, nbr), np.maximum(q, nbr)
        pairs = np.unique(np.stack([lo, hi], 1), axis=0) if len(lo) else np.zeros((0, 2), np.int64)
        ctx.count("links", len(q))
        if accept_above is not None:
            return _band_requests(lo, hi, sim, pairs, accept_above, ctx)
        leaf, root = star_forest(pairs[:, 0], pairs[:, 1])
        return {"edges": edge_rows(leaf, root, ctx.partitions["edges"])}

    def recall(inputs, ctx: TaskContext) -> Artifact:
        eq, en, es = _topk(*_read_triples(inputs["assign/exact"]), k)
        iq, inb, isim = _topk(*_read_triples(inputs["search/recall_ivf"]), k)
        if len(eq) == 0:
            return Artifact(facts={f"recall_at_{k}": None, "queries": 0})
        exact = set(zip(eq.tolist(), en.tolist()))
        found = set(zip(iq.tolist(), inb.tolist()))
        return Artifact(facts={f"recall_at_{k}": round(len(exact & found) / max(1, len(exact)), 4), "queries": int(len(np.unique(eq)))})

    return [
        MapStep("sample", sample, [Output("queries", 1), Output("train", 1)], columns=(descriptor,)),
        AggregateStep("quantizer", ["sample/queries", "sample/train"], quantizer),
        MapStep("assign", assign, [Output("lists", lambda s: s.facts["quantizer"]["lists"]), Output("exact", 1)], columns=(descriptor,)),
        ReduceStep("search", "assign/lists", search, [Output("candidates", lambda s: s.partitions_for(s.n_rows)), Output("recall_ivf", 1)]),
        ReduceStep("merge", "search/candidates", merge,
                   [Output("requests", lambda s: s.n_groups) if accept_above is not None else Output("edges", lambda s: s.partitions_for(s.n_rows))]),
        AggregateStep("recall", ["assign/exact", "search/recall_ivf"], recall),
        *([] if accept_above is not None else [ComponentsStep("components", "merge/edges")]),
    ]


def _band_requests(lo, hi, sim, pairs, accept_above: float, ctx: TaskContext) -> dict:
    """Verification requests for the distinct pairs: the larger similarity of the two directions,
    checked geometrically unless above ``accept_above``."""
    if len(pairs) == 0:
        return {}
    order = np.lexsort((-sim, hi, lo))
    lo, hi, sim = lo[order], hi[order], sim[order]
    first = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    lo, hi, sim = lo[first], hi[first], sim[first]
    return {"requests": pair_requests(lo, hi, sim, sim <= accept_above, ctx)}


def _stored_chunks(part, descriptor: str, max_rows: int):
    """The list's own vectors (primary rows), at most ``max_rows`` at a time: one pass over the
    partition per chunk, so a list larger than a task's budget is searched in pieces."""
    total = sum(int(np.sum(c.column(PRIMARY).to_numpy(zero_copy_only=False))) for c in part.chunks([PRIMARY]))
    for start in range(0, total, max_rows):
        uids, xs, seen = [], [], 0
        for c in part.chunks([schema.UID, PRIMARY, VEC]):
            prim = np.flatnonzero(c.column(PRIMARY).to_numpy(zero_copy_only=False))
            lo, hi = max(0, start - seen), min(len(prim), start + max_rows - seen)
            seen += len(prim)
            if lo >= hi:
                continue
            take = pa.array(prim[lo:hi])
            x, _ = descriptor_matrix(c.column(VEC).take(take), descriptor)
            uids.append(c.column(schema.UID).take(take).to_numpy())
            xs.append(normalize_rows(x))
        if uids:
            yield np.concatenate(uids), np.concatenate(xs)


def _query_chunks(part, descriptor: str):
    for c in part.chunks([schema.UID, VEC]):
        x, _ = descriptor_matrix(c.column(VEC), descriptor)
        yield c.column(schema.UID).to_numpy(), normalize_rows(x)


def graph_summary(counters: dict, facts: dict, k: int, threshold: float, settings) -> dict:
    """The k-NN graph part of a partitioned stage's summary."""
    a, s, m = counters.get("assign", {}), counters.get("search", {}), counters.get("merge", {})
    q = facts.get("quantizer", {})
    exact_s, pairs = a.get("exact_seconds", 0.0), a.get("exact_pairs", 0)
    n = a.get("vectors", 0)
    est = exact_s / pairs * n * n if pairs else None
    lists = q.get("lists", 1)
    return {
        "links": int(m.get("links", 0)),  # (image, neighbour) pairs kept: an edge may count twice
        "k": k,
        "threshold": threshold,
        "index": {
            "form": "IVF-partitioned",
            "lists": lists,
            "list_probe": min(settings.list_probe, lists),
            **({} if settings.list_probe_margin is None else {"list_probe_margin": settings.list_probe_margin, "list_probe_min": settings.list_probe_min}),
            "lists_searched_per_vector": round(s.get("probes", 0) / n, 3) if n else None,
            "exact": settings.probes_every_list(lists) and not s.get("approximate_chunks", 0),
            "per_list_spec": settings.spec,
            "largest_list": int(s.get("list_rows_max", 0)),
            "train_rows": q.get("train_rows"),
        },
        f"recall_at_{k}": facts.get("recall", {}).get(f"recall_at_{k}"),
        "recall_queries": facts.get("recall", {}).get("queries"),
        "search_seconds": round(s.get("search_seconds", 0.0), 3),
        "exact_search_seconds_estimate": None if est is None else round(est, 1),
    }
