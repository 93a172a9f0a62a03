"""PCA-hash deduplication (the first deduplication step of LVD-142M).

The paper names it without details; we read it as: fit a PCA on a sample of image descriptors
(a model descriptor, or downscaled pixels when no model is configured), project every pool
image on the top ``bits`` components, keep the sign bits as a hash, and treat equal hashes
(``radius: 0``) or hashes within a small Hamming radius as duplicates. Groups are connected
components; one image per group is kept (largest width*height, ties by smallest uid).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, model_validator

from curation import schema
from curation.dedup.binary import hamming, hamming_pairs
from curation.dedup.components import connected_components
from curation.dedup.descriptors import normalize_rows
from curation.dedup.groups import duplicate_drops, pool_descriptors
from curation.dedup.pca_hash import fit_pca, sign_codes
from curation.dedup.settings import DedupStageConfig
from curation.stage import GlobalResult, GlobalStage, Resources, empty_drops


class PcaHashConfig(DedupStageConfig):
    kind: Literal["pca_hash"] = "pca_hash"
    descriptor: str = Field("pixels_descriptor", description="descriptor column (fixed-size list of floats) to hash")
    # 64 bits within radius 2 on the 32x32 pixel descriptor: precision 0.998 on real photos with
    # transformed copies and distractors (benchmarks/dedup_quality.py); more bits split copies.
    bits: int = Field(64, ge=64, le=256, description="sign bits kept (a multiple of 8, at most the descriptor size)")
    radius: int = Field(2, ge=0, description="largest Hamming distance counted as a duplicate; 0 = equal hashes only")
    sample_size: int = Field(100_000, ge=2, description="descriptors sampled to fit the PCA")
    normalize: bool = Field(True, description="L2-normalise descriptors before the PCA")
    index: Literal["auto", "flat", "multihash"] = "auto"
    reason: str = "pca_hash_duplicate"

    @model_validator(mode="after")
    def _bits_multiple_of_8(self) -> "PcaHashConfig":
        if self.bits % 8:
            raise ValueError(f"bits must be a multiple of 8, got {self.bits}")
        return self


class PcaHashStage(GlobalStage):
    kind = "pca_hash"
    Config = PcaHashConfig
    roles = (schema.POOL,)

    def input_columns(self):
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.descriptor)

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        rows, x, summary = pool_descriptors(table, cfg.descriptor)
        if cfg.normalize:
            x = normalize_rows(x)
        if len(rows) < 2:  # nothing to compare (and no PCA to fit)
            summary.update({"edges": 0, "components": 0, "dropped": 0, "seconds": round(time.perf_counter() - t0, 3)})
            return GlobalResult(empty_drops(), summary=summary)
        projection = fit_pca(x, cfg.bits, cfg.sample_size, self.context.seed)
        codes = sign_codes(x, projection)
        del x
        i, j, _, method = hamming_pairs(codes, cfg.radius, cfg.index)
        labels = connected_components(len(rows), i, j)
        drops, counts = duplicate_drops(rows, labels, cfg.reason, "hamming_distance", lambda d, k: hamming(codes[d], codes[k]))
        summary.update(
            {
                "edges": int(len(i)),
                "components": counts["groups"],
                "dropped": counts["dropped"],
                "largest_group": counts["largest_group"],
                "distinct_hashes": int(len(np.unique(codes.view(np.dtype((np.void, codes.shape[1])))))),
                "bits": cfg.bits,
                "radius": cfg.radius,
                "index": method,
                "explained_variance_ratio": round(projection.explained_variance_ratio, 4),
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )
        return GlobalResult(drops, summary=summary)


STAGE = PcaHashStage
