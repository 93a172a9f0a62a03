"""The one YAML model of a k-NN index, shared by copy_dedup, decontaminate and retrieve.

Single-task form: one ``retrieval.index.KnnIndex`` over every vector (``spec``, ``gpu`` and the
search knobs). Partitioned form (``curation.dedup.ivf_graph``): a coarse quantizer trained on a
bounded sample cuts the vectors into lists of about ``list_size``; each vector is searched in its
``list_probe`` nearest lists, each list on one task with a per-list index of the same ``spec``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

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
    list_probe: int = Field(3, ge=1, description="partitioned runs: coarse lists each vector is searched in (all lists = exact)")
    train_points_per_list: int = Field(64, ge=1, description="partitioned runs: sample size of the coarse quantizer per list")
    recall_queries: int = Field(1000, ge=0, description="queries whose k-NN is checked against exact search on every run")

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
