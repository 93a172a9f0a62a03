"""Copy-detection self-deduplication of the pool, as published for LVD-142M.

Every pool image's copy-detection descriptor (e.g. SSCD, 512-d, L2-normalised) is searched for
its k = 64 nearest neighbours; pairs with cosine similarity above 0.6 are edges; connected
components of that graph are groups of copies and one image per group is kept: the largest
width*height, ties by the smallest uid. Seed and evaluation images pass through untouched (seeds
are curated on purpose; evaluation images are handled by ``decontaminate``). Every drop names
its kept representative and their cosine similarity.

Single-task form: one k-NN index over every descriptor (``curation.dedup.knn_graph``).
Partitioned form: the IVF-partitioned graph (``curation.dedup.ivf_graph``), distributed
components, and the keep rule per component. Every run measures the graph's recall@k against
exact search on sampled queries (1.0 without measuring when the search is exact).
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.dedup.groups import duplicate_drops, with_descriptor
from curation.dedup.ivf_graph import graph_summary, knn_graph_steps
from curation.dedup.knn_graph import graph_recall, knn_edges
from curation.dedup.settings import GroupingConfig, KnnGraphConfig, knn_resources
from curation.partitioned.keepers import duplicate_keep, keep_step, members_step
from curation.partitioned.keys import sample_rate, sampled
from curation.stage import GlobalResult, GlobalStage, Resources


class CopyDedupConfig(KnnGraphConfig, GroupingConfig):
    kind: Literal["copy_dedup"] = "copy_dedup"
    threshold: float = Field(0.6, ge=-1, le=1, description="cosine similarity above which two images are copies")
    reason: str = "near_duplicate"


def cosine(x: np.ndarray, d: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x[d], x[k])


def above(x: np.ndarray, threshold: float):
    """The star rule's test: cosine to the kept image above the threshold."""
    return lambda kept, cand: np.einsum("nd,d->n", x[cand], x[kept]) > threshold


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
        rows, x, counts = with_descriptor(table, cfg.descriptor)
        x = normalize_rows(x)
        index = cfg.index.make_index(x.shape[1] if x.ndim == 2 else 1, self.context.seed)
        graph = knn_edges(x, cfg.k, cfg.threshold, index)
        labels = connected_components(len(rows), graph.src, graph.dst)
        passes = above(x, cfg.threshold) if cfg.grouping == "star" else None
        drops, groups = duplicate_drops(rows, labels, cfg.reason, "similarity", lambda d, k: cosine(x, d, k), passes)
        queries = np.flatnonzero(sampled(rows.uid, sample_rate(cfg.index.recall_queries, len(rows)), self.context.seed))
        summary = {
            **counts,
            "edges": graph.num_edges,
            "components": groups["groups"],
            "dropped": groups["dropped"],
            "largest_group": groups["largest_group"],
            "k": cfg.k,
            "grouping": cfg.grouping,
            "threshold": cfg.threshold,
            "index": graph.index,
            f"recall_at_{cfg.k}": round(graph_recall(x, index, cfg.k, queries), 4) if len(rows) > 1 else None,
            "graph_seconds": round(graph.seconds, 3),
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(drops, summary=summary)

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        cfg = self.config

        def vectors(members):
            return normalize_rows(descriptor_matrix(members.column(cfg.descriptor), cfg.descriptor)[0])

        def score(members, d, k, ctx):
            return cosine(vectors(members), d, k)

        def test(members, ctx):
            return above(vectors(members), cfg.threshold) if cfg.grouping == "star" else None

        return [
            *knn_graph_steps(cfg.descriptor, cfg.k, cfg.threshold, cfg.index, self.context.seed),
            members_step("members", "components/labels", (cfg.descriptor,)),
            keep_step("keep", "members/members", duplicate_keep(cfg.reason, "similarity", score, test)),
        ]

    def partitioned_summary(self, counters, facts):
        keep = counters.get("keep", {})
        vectors = int(counters.get("assign", {}).get("vectors", 0))
        return {
            "rows": vectors,
            **graph_summary(counters, facts, self.config.k, self.config.threshold, self.config.index),
            "components": int(keep.get("components", 0)),
            "dropped": int(keep.get("dropped", 0)),
            "largest_group": int(keep.get("largest_group_max", 0)),
            "grouping": self.config.grouping,
        }


STAGE = CopyDedupStage
