"""Similarity graph from a k-NN search: edge i -- j when j is among i's k nearest neighbours
(or i among j's) with cosine similarity above a threshold, as in DINOv2's copy-detection
deduplication (k = 64, cosine > 0.6)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from retrieval.index import KnnIndex, SearchParams


@dataclass
class IndexOptions:
    """How to build the k-NN index (see ``retrieval.index``)."""

    spec: str = "auto"
    gpu: str = "auto"
    backend: str = "auto"
    nprobe: int = 32
    ef_search: int = 128
    rerank_factor: int = 2
    query_batch: int = 16_384
    max_vectors_per_shard: int = 50_000_000
    seed: int = 0

    def make_index(self, dim: int) -> KnnIndex:
        return KnnIndex(
            dim=dim,
            spec=self.spec,
            metric="ip",
            gpu=self.gpu,
            backend=self.backend,
            params=SearchParams(self.nprobe, self.ef_search, self.rerank_factor, self.query_batch),
            max_vectors_per_shard=self.max_vectors_per_shard,
            seed=self.seed,
        )


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


def knn_edges(x: np.ndarray, k: int, threshold: float, options: IndexOptions | None = None) -> Graph:
    """Edges of the thresholded k-NN graph of the L2-normalised rows of ``x``.

    Each row is searched for ``k + 1`` neighbours (its own match is discarded), results are
    reduced chunk by chunk to edges above ``threshold``, so memory is O(N + edges).
    """
    t0 = time.perf_counter()
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    options = options or IndexOptions()
    if n < 2:
        empty = np.zeros(0, np.int64)
        return Graph(n, empty, empty, np.zeros(0, np.float32), {}, time.perf_counter() - t0)
    index = options.make_index(x.shape[1]).add(x)
    src, dst, sim = [], [], []
    for start, sims, ids in index.search_chunks(x, k + 1):
        rows = np.arange(start, start + len(ids), dtype=np.int64)[:, None]
        keep = (ids >= 0) & (ids != rows) & (sims > threshold)
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
