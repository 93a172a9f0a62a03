"""YAML settings shared by the deduplication stages."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from curation.dedup.hash_band import HashBand
from curation.index_settings import IndexSettings
from curation.stage import Resources, StageConfig


class DedupStageConfig(StageConfig):
    """Fields every global deduplication stage has."""

    reason: str = Field(description="ledger reason of dropped rows")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved for the global task (faiss still uses every core of its node)")


class GroupingConfig(DedupStageConfig):
    """A copy-deduplication stage: which images a group of linked images keeps."""

    grouping: Literal["components", "star"] = Field(
        "components",
        description="components: one image kept per connected component (the paper's rule; chains drop unlike images); "
        "star: each drop passes the stage's test against the very image kept in its place",
    )


class HashDedupConfig(GroupingConfig):
    """A stage that links images whose binary codes lie within a Hamming radius."""

    buckets: Literal["substrings", "pairs"] = Field(
        "substrings",
        description="partitioned form: multi-index buckets on single substrings (r+1 keys per code, FAISS within buckets) "
        "or on pairs of r+2 substrings (C(r+2,2) keys, ~60x fewer comparisons at radius 6, 4x the shuffle); measured "
        "2.1x slower than substrings at 4M codes (benchmarks/results/scale_hash_buckets-*.json), for far larger crawls",
    )
    band: HashBand | None = Field(
        None, description="pairs farther apart than band.accept_within bits (up to the radius) become edges only when "
        "their local features verify geometrically (needs a `local_features` stage before this one)",
    )

    @model_validator(mode="after")
    def _band_inside_radius(self) -> "HashDedupConfig":
        radius = getattr(self, "radius", None)
        if self.band is not None and radius is not None and self.band.accept_within >= radius:
            raise ValueError(f"band.accept_within ({self.band.accept_within}) must be below radius ({radius}): nothing would be verified")
        return self


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
