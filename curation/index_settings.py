"""The one YAML model of a k-NN index, shared by copy_dedup, decontaminate and retrieve.

Single-task form: one ``retrieval.index.KnnIndex`` over every vector (``spec``, ``gpu`` and the
search knobs). Partitioned form (``curation.dedup.ivf_graph``): a coarse quantizer trained on a
bounded sample cuts the vectors into lists of about ``list_size``; each vector is searched in its
``list_probe`` nearest lists (or, with ``list_probe_margin``, in the lists nearly as close as its
nearest), each list on one task with a per-list index of the same ``spec``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from retrieval.index import KnnIndex, SearchParams


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    spec: str = Field(
        "auto",
        description="faiss index_factory string ('Flat', 'HNSW32', 'IVF4096,Flat', 'IVF4096,PQ64') or 'auto' "
        "(Flat up to 100k vectors on CPU / 5M on a faiss GPU, IVF beyond); in partitioned runs, the per-list index",
    )
    gpu: Literal["auto", "never", "always"] = Field("auto", description="use a GPU when faiss or torch sees one")
    nprobe: int = Field(32, ge=1, description="IVF lists visited per query (inside an IVF index)")
    ef_search: int = Field(128, ge=1, description="HNSW search breadth")
    rerank_factor: int = Field(2, ge=1, description="approximate candidates per neighbour re-scored exactly")
    query_batch: int = Field(16_384, ge=1, description="queries searched at once (bounds temporary memory)")
    max_vectors_per_shard: int = Field(50_000_000, ge=1, description="database vectors per index shard (one device's memory)")
    # Partitioned form.
    list_size: int = Field(100_000, ge=1, description="partitioned runs: target vectors per coarse list (one list = one search task)")
    list_probe: int = Field(
        3, ge=1, description="partitioned runs: coarse lists each vector is searched in (all lists = exact); with list_probe_margin, at most this many"
    )
    list_probe_margin: float | None = Field(
        None,
        ge=0,
        le=2,
        description="partitioned runs: search each vector in every list whose centroid's cosine is within this margin of its nearest "
        "centroid's (at least list_probe_min, at most list_probe lists); unset: always list_probe lists",
    )
    list_probe_min: int = Field(1, ge=1, description="partitioned runs with list_probe_margin: lists every vector is searched in at least")
    train_points_per_list: int = Field(64, ge=1, description="partitioned runs: sample size of the coarse quantizer per list")
    recall_queries: int = Field(1000, ge=0, description="queries whose k-NN is checked against exact search on every run")

    @model_validator(mode="after")
    def _probe_bounds(self):
        if self.list_probe_min > self.list_probe:
            raise ValueError(f"list_probe_min ({self.list_probe_min}) must not exceed list_probe ({self.list_probe})")
        return self

    def probed(self, sims: np.ndarray) -> np.ndarray:
        """bool [n, p]: which of each vector's p nearest lists (``sims``, cosine to their
        centroids, best first) it is searched in. A margin probes the lists a near duplicate may
        be stored in: a copy sits close to the boundary of its original's list exactly when
        that list's centroid is nearly as close as its own, so boundary vectors probe more
        lists and the rest fewer (measured at 4M vectors: half the search of 10 fixed probes,
        and no planted copy group left split, against 3 with 10 fixed)."""
        col = np.arange(sims.shape[1])[None, :]
        if self.list_probe_margin is None:
            return np.broadcast_to(col < self.list_probe, sims.shape)
        near = sims >= sims[:, :1] - self.list_probe_margin
        return (col < self.list_probe) & (near | (col < self.list_probe_min))

    def probes_every_list(self, lists: int) -> bool:
        """Whether every vector is searched in every list (the partitioned search is exact)."""
        least = self.list_probe if self.list_probe_margin is None or self.list_probe_margin >= 2 else self.list_probe_min
        return least >= lists

    def search_params(self) -> SearchParams:
        return SearchParams(self.nprobe, self.ef_search, self.rerank_factor, self.query_batch)

    def make_index(self, dim: int, seed: int = 0, spec: str | None = None) -> KnnIndex:
        return KnnIndex(
            dim=dim,
            spec=spec or self.spec,
            metric="ip",
            gpu=self.gpu,
            params=self.search_params(),
            max_vectors_per_shard=self.max_vectors_per_shard,
            seed=seed,
        )
