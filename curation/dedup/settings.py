"""YAML settings shared by the deduplication stages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curation.dedup.knn_graph import IndexOptions


class IndexSettings(BaseModel):
    """The k-NN index used to build a similarity graph (see ``retrieval.index``)."""

    model_config = ConfigDict(extra="forbid")

    spec: str = Field(
        "auto",
        description="faiss index_factory string ('Flat', 'HNSW32', 'IVF4096,PQ64') or 'auto' "
        "(Flat up to 100k vectors on CPU / any size on a GPU, IVF-PQ above)",
    )
    gpu: Literal["auto", "never", "always"] = Field("auto", description="use a GPU when faiss or torch sees one")
    nprobe: int = Field(32, ge=1, description="IVF lists visited per query")
    ef_search: int = Field(128, ge=1, description="HNSW search breadth")
    rerank_factor: int = Field(2, ge=1, description="approximate candidates per neighbour re-scored exactly")
    query_batch: int = Field(16_384, ge=1)
    max_vectors_per_shard: int = Field(50_000_000, ge=1, description="database vectors per index shard (one device's memory)")

    def options(self, seed: int = 0) -> IndexOptions:
        return IndexOptions(
            spec=self.spec,
            gpu=self.gpu,
            nprobe=self.nprobe,
            ef_search=self.ef_search,
            rerank_factor=self.rerank_factor,
            query_batch=self.query_batch,
            max_vectors_per_shard=self.max_vectors_per_shard,
            seed=seed,
        )
