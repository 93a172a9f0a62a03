"""Copy-detection self-deduplication of the pool, as published for LVD-142M.

Every pool image's copy-detection descriptor (e.g. SSCD, 512-d, L2-normalised) is searched for
its k = 64 nearest neighbours; pairs with cosine similarity above 0.6 are edges; connected
components of that graph are groups of copies and one image per group is kept: the largest
width*height, ties by the smallest uid. Seed and evaluation images pass through untouched (seeds
are curated on purpose; evaluation images are handled by ``decontaminate``). Every drop names
its kept representative and their cosine similarity.

With ``band`` (an ambiguous similarity band, e.g. 0.45-0.75), a pair above the band is an edge,
a pair below it is not, and a pair inside it becomes an edge only when the two images' local
features (a ``local_features`` stage) verify geometrically, as in ``local_copy_dedup``: a
learned descriptor is sure of its high scores and unsure of its middling ones, which a
geometric check settles. Each drop's details then say which evidence links it to the image kept
in its place (``evidence``: ``similarity``, ``geometric``, or ``chain`` when neither holds
directly and the link runs through other images).

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
from pydantic import Field, model_validator

from curation import schema
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.dedup.band import BandEvidence, GeometricCheck, band_edges, band_passes
from curation.dedup.local_features import column_features
from curation.dedup.local_steps import FEATURE_ROW_WEIGHT, PairVerification, verification_summary
from curation.dedup.groups import duplicate_drops, with_descriptor
from curation.dedup.ivf_graph import graph_summary, knn_graph_steps
from curation.dedup.knn_graph import graph_recall, knn_edges
from curation.dedup.settings import GroupingConfig, KnnGraphConfig, knn_resources
from curation.partitioned.keepers import duplicate_keep, keep_step, members_step
from curation.partitioned.steps import ComponentsStep
from curation.partitioned.keys import sample_rate, sampled
from curation.stage import GlobalResult, GlobalStage, Resources


class SimilarityBand(GeometricCheck):
    """Pairs whose similarity falls in (low, high] are verified with local features."""

    low: float = Field(0.45, ge=-1, le=1, description="at or below: never an edge")
    high: float = Field(0.75, ge=-1, le=1, description="above: an edge without verification")

    @model_validator(mode="after")
    def _ordered(self) -> "SimilarityBand":
        if self.low >= self.high:
            raise ValueError(f"band low ({self.low}) must be below high ({self.high})")
        return self


class CopyDedupConfig(KnnGraphConfig, GroupingConfig):
    kind: Literal["copy_dedup"] = "copy_dedup"
    threshold: float = Field(0.6, ge=-1, le=1, description="cosine similarity above which two images are copies (without `band`)")
    band: SimilarityBand | None = Field(None, description="ambiguous band verified geometrically; replaces `threshold` when set")
    reason: str = "near_duplicate"

    @property
    def candidate_threshold(self) -> float:
        return self.band.low if self.band else self.threshold


def cosine(x: np.ndarray, d: np.ndarray, k: np.ndarray) -> np.ndarray:
    return np.einsum("nd,nd->n", x[d], x[k])


def above(x: np.ndarray, threshold: float):
    """The star rule's test: cosine to the kept image above the threshold."""
    return lambda kept, cand: np.einsum("nd,d->n", x[cand], x[kept]) > threshold


def similarity_band_passes(x: np.ndarray, feats: list, band: SimilarityBand):
    """The star rule's test with a band: above it, or inside it and verified geometrically."""
    return band_passes(band, feats, above(x, band.high), above(x, band.low))


class CopyDedupStage(GlobalStage):
    kind = "copy_dedup"
    Config = CopyDedupConfig
    roles = (schema.POOL,)

    def input_columns(self):
        band = (self.config.band.features,) if self.config.band else ()
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.descriptor, *band)

    def resources(self) -> Resources:
        return knn_resources(self.config, self.context)

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        rows, x, counts = with_descriptor(table, cfg.descriptor)
        x = normalize_rows(x)
        index = cfg.index.make_index(x.shape[1] if x.ndim == 2 else 1, self.context.seed)
        graph = knn_edges(x, cfg.k, cfg.candidate_threshold, index)
        src, dst, band_summary, feats = graph.src, graph.dst, {}, None
        if cfg.band:
            feats = column_features(table.filter(pa.array(table.column(cfg.descriptor).is_valid())).column(cfg.band.features))
            keep, band_summary = band_edges(cfg.band, feats, graph.src, graph.dst, graph.sim > cfg.band.high, "similarity")
            src, dst = graph.src[keep], graph.dst[keep]
        labels = connected_components(len(rows), src, dst)
        star = cfg.grouping == "star"
        if cfg.band is None:
            passes = above(x, cfg.threshold) if star else None
            drops, groups = duplicate_drops(rows, labels, cfg.reason, "similarity", lambda d, k: cosine(x, d, k), passes)
        else:
            evidence = BandEvidence(cfg.band, "similarity")
            passes = similarity_band_passes(x, feats, cfg.band) if star else None
            drops, groups = duplicate_drops(rows, labels, cfg.reason, "similarity", lambda d, k: band_score(evidence, x, feats, rows.uid, d, k), passes)
            drops = evidence.enrich(drops)
        queries = np.flatnonzero(sampled(rows.uid, sample_rate(cfg.index.recall_queries, len(rows)), self.context.seed))
        summary = {
            **counts,
            "edges": int(len(src)),
            **band_summary,
            "components": groups["groups"],
            "dropped": groups["dropped"],
            "largest_group": groups["largest_group"],
            "k": cfg.k,
            "grouping": cfg.grouping,
            "threshold": cfg.threshold if cfg.band is None else None,
            **({} if cfg.band is None else {"band": [cfg.band.low, cfg.band.high]}),
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

        if cfg.band is None:
            return [
                *knn_graph_steps(cfg.descriptor, cfg.k, cfg.threshold, cfg.index, self.context.seed),
                members_step("members", "components/labels", (cfg.descriptor,)),
                keep_step("keep", "members/members", duplicate_keep(cfg.reason, "similarity", score, test)),
            ]
        band = cfg.band

        def band_test(members, ctx):
            return similarity_band_passes(vectors(members), column_features(members.column(band.features)), band) if cfg.grouping == "star" else None

        def keep(table, labels, ctx):
            evidence = BandEvidence(band, "similarity")

            def score(members, d, k, ctx):
                feats = column_features(members.column(band.features))
                return band_score(evidence, vectors(members), feats, members.column(schema.UID).to_numpy(), d, k)

            return evidence.enrich(duplicate_keep(cfg.reason, "similarity", score, band_test)(table, labels, ctx))

        verification = PairVerification(band, FEATURE_ROW_WEIGHT, "similarity")
        return [
            *knn_graph_steps(cfg.descriptor, cfg.k, band.low, cfg.index, self.context.seed, accept_above=band.high),
            *verification.steps("merge/requests"),
            ComponentsStep("components", "verify/edges"),
            members_step("members", "components/labels", (cfg.descriptor, band.features), row_weight=FEATURE_ROW_WEIGHT),
            keep_step("keep", "members/members", keep),
        ]

    def partitioned_summary(self, counters, facts):
        keep = counters.get("keep", {})
        vectors = int(counters.get("assign", {}).get("vectors", 0))
        cfg = self.config
        band = {} if cfg.band is None else {**verification_summary(counters, "similarity"), "band": [cfg.band.low, cfg.band.high], "threshold": None}
        return {
            "rows": vectors,
            **graph_summary(counters, facts, cfg.k, cfg.candidate_threshold, cfg.index),
            **band,
            "components": int(keep.get("components", 0)),
            "dropped": int(keep.get("dropped", 0)),
            "largest_group": int(keep.get("largest_group_max", 0)),
            "grouping": self.config.grouping,
        }


def band_score(evidence: BandEvidence, x: np.ndarray, feats: list, uids: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
    """The cosine of each drop to its kept image (the ledger's score), recording the evidence."""
    sims = cosine(x, dropped, kept)
    band = evidence.check
    evidence.record(feats, uids, dropped, kept, sims > band.high, sims > band.low)
    return sims


STAGE = CopyDedupStage
