"""YAML settings shared by the deduplication stages."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from curation.dedup.knn_graph import IndexOptions
from curation.stage import Resources, StageConfig


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


class DedupStageConfig(StageConfig):
    """Fields every global deduplication stage has."""

    reason: str = Field(description="ledger reason of dropped rows")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved for the global task (faiss still uses every core of its node)")


class KnnGraphConfig(DedupStageConfig):
    """A stage that links images through a k-NN graph of descriptors (copy detection,
    decontamination): the published k = 64 over SSCD descriptors."""

    descriptor: str = Field("sscd_descriptor", description="copy-detection descriptor column written by an `embed` stage")
    k: int = Field(64, ge=1, description="nearest neighbours searched per image")
    threshold: float = Field(ge=-1, le=1, description="cosine similarity above which two images are linked")
    index: IndexSettings = Field(default_factory=IndexSettings)


def knn_resources(config: KnnGraphConfig, context) -> Resources:
    """One GPU when the cluster has one and the index may use it."""
    gpus = 1.0 if context.cluster_gpus > 0 and config.index.gpu != "never" else 0.0
    return Resources(num_cpus=config.num_cpus, num_gpus=gpus)
