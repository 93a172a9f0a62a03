"""Similarity graph from a k-NN search: edge i -- j when j is among i's k nearest neighbours
(or i among j's) with cosine similarity above a threshold, as in DINOv2's copy-detection
deduplication (k = 64, cosine > 0.6)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retrieval.index import KnnIndex


@dataclass
class Graph:
    """Undirected edges (src < dst) with their cosine similarity."""

    n: int
    src: np.ndarray
    dst: np.ndarray
    sim: np.ndarray
    index: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def num_edges(self) -> int:
        return len(self.src)


def knn_edges(x: np.ndarray, k: int, threshold: float, index: KnnIndex) -> Graph:
    """Edges of the thresholded k-NN graph of the L2-normalised rows of ``x``, searched with the
    (empty) ``index``.

    Each row is searched for ``k + 1`` neighbours; its own match is discarded and at most ``k``
    others are kept. Results are reduced chunk by chunk to edges above ``threshold``, so memory
    is O(N + edges).
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 2:
        empty = np.zeros(0, np.int64)
        return Graph(n, empty, empty, np.zeros(0, np.float32), {}, time.perf_counter() - t0)
    index.add(x)
    src, dst, sim = [], [], []
    for start, sims, ids in index.search_chunks(x, k + 1):
        rows = np.arange(start, start + len(ids), dtype=np.int64)[:, None]
        others = (ids >= 0) & (ids != rows)
        others &= np.cumsum(others, axis=1) <= k  # k neighbours besides itself (ties may hide it)
        keep = others & (sims > threshold)
        a = np.broadcast_to(rows, ids.shape)[keep]
        b = ids[keep]
        src.append(np.minimum(a, b))
        dst.append(np.maximum(a, b))
        sim.append(sims[keep])
    src, dst, sim = np.concatenate(src), np.concatenate(dst), np.concatenate(sim)
    # i->j and j->i are one undirected edge: keep the first of each.
    _, first = np.unique(src * n + dst, return_index=True)
    graph = Graph(n, src[first], dst[first], sim[first].astype(np.float32), index.describe(), 0.0)
    graph.seconds = time.perf_counter() - t0
    return graph


def graph_recall(x: np.ndarray, index: KnnIndex, k: int, queries: np.ndarray) -> float:
    """recall@k of ``index`` (already built over ``x``) against exact search, on rows ``queries``
    (the self match excluded on both sides). 1.0 without computing when the index is exact."""
    if index.exact or len(queries) == 0:
        return 1.0
    import faiss

    flat = faiss.IndexFlatIP(x.shape[1])
    flat.add(x)
    kk = min(k + 1, len(x))
    _, exact = flat.search(x[queries], kk)
    _, found = index.search(x[queries], kk)
    hits = total = 0
    for q, e, f in zip(queries, exact, found):
        e = [i for i in e if i != q and i >= 0][:k]
        f = {i for i in f if i != q and i >= 0}
        hits += len(set(e) & f)
        total += len(e)
    return hits / max(1, total)
