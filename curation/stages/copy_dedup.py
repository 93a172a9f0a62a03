"""Copy-detection self-deduplication of the pool, as published for LVD-142M.

Every pool image's copy-detection descriptor (e.g. SSCD, 512-d, L2-normalised) is searched for
its k = 64 nearest neighbours; pairs with cosine similarity above 0.6 are edges; connected
components of that graph are groups of copies and one image per group is kept: the largest
width*height, ties by the smallest uid. Seed and evaluation images pass through untouched (seeds
are curated on purpose; evaluation images are handled by ``decontaminate``). Every drop names
its kept representative and their cosine similarity.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.dedup.components import connected_components
from curation.dedup.descriptors import normalize_rows
from curation.dedup.groups import duplicate_drops, pool_descriptors
from curation.dedup.knn_graph import knn_edges
from curation.dedup.settings import KnnGraphConfig, knn_resources
from curation.stage import GlobalResult, GlobalStage, Resources


class CopyDedupConfig(KnnGraphConfig):
    kind: Literal["copy_dedup"] = "copy_dedup"
    threshold: float = Field(0.6, ge=-1, le=1, description="cosine similarity above which two images are copies")
    reason: str = "near_duplicate"


class CopyDedupStage(GlobalStage):
    kind = "copy_dedup"
    Config = CopyDedupConfig
    roles = (schema.POOL,)

    def input_columns(self):
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.descriptor)

    def resources(self) -> Resources:
        return knn_resources(self.config, self.context)

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        rows, x, counts = pool_descriptors(table, cfg.descriptor)
        x = normalize_rows(x)
        graph = knn_edges(x, cfg.k, cfg.threshold, cfg.index.options(self.context.seed))
        labels = connected_components(len(rows), graph.src, graph.dst)
        drops, groups = duplicate_drops(
            rows, labels, cfg.reason, "similarity", lambda d, k: np.einsum("nd,nd->n", x[d], x[k])
        )
        summary = {
            **counts,
            "edges": graph.num_edges,
            "components": groups["groups"],
            "dropped": groups["dropped"],
            "largest_group": groups["largest_group"],
            "k": cfg.k,
            "threshold": cfg.threshold,
            "index": graph.index,
            "graph_seconds": round(graph.seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(drops, summary=summary)


STAGE = CopyDedupStage
