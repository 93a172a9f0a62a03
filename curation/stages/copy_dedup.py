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
from pydantic import BaseModel, ConfigDict, Field, model_validator

from curation import schema
from curation.dedup.components import connected_components
from curation.dedup.descriptors import descriptor_matrix, normalize_rows
from curation.dedup.geometry import VerifySettings, verify_pair
from curation.dedup.local_features import column_features
from curation.dedup.local_steps import FEATURE_ROW_WEIGHT, PairVerification, merge_details, verification_summary
from curation.dedup.groups import duplicate_drops, with_descriptor
from curation.dedup.ivf_graph import graph_summary, knn_graph_steps
from curation.dedup.knn_graph import graph_recall, knn_edges
from curation.dedup.settings import GroupingConfig, KnnGraphConfig, knn_resources
from curation.partitioned.keepers import duplicate_keep, keep_step, members_step
from curation.partitioned.steps import ComponentsStep
from curation.partitioned.keys import sample_rate, sampled
from curation.stage import GlobalResult, GlobalStage, Resources


class SimilarityBand(BaseModel):
    """Pairs whose similarity falls in (low, high] are verified with local features."""

    model_config = ConfigDict(extra="forbid")

    low: float = Field(0.45, ge=-1, le=1, description="at or below: never an edge")
    high: float = Field(0.75, ge=-1, le=1, description="above: an edge without verification")
    features: str = Field("local_features", description="features column written by a `local_features` stage")
    mirror: bool = Field(True, description="also match the mirrored image's features")
    verify: VerifySettings = Field(default_factory=VerifySettings)

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


def band_passes(x: np.ndarray, feats: list, band: SimilarityBand):
    """The star rule's test with a band: above it, or inside it and verified geometrically."""

    def passes(kept, cand):
        sims = np.einsum("nd,d->n", x[cand], x[kept])
        ok = sims > band.high
        for i in np.flatnonzero((sims > band.low) & ~ok):
            verdict = verify_pair(feats[cand[i]], feats[kept], band.verify, band.mirror)
            ok[i] = verdict is not None and verdict.ok
        return ok

    return passes


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
            keep, band_summary = band_edges(cfg.band, feats, graph.src, graph.dst, graph.sim)
            src, dst = graph.src[keep], graph.dst[keep]
        labels = connected_components(len(rows), src, dst)
        star = cfg.grouping == "star"
        if cfg.band is None:
            passes = above(x, cfg.threshold) if star else None
            drops, groups = duplicate_drops(rows, labels, cfg.reason, "similarity", lambda d, k: cosine(x, d, k), passes)
        else:
            evidence = BandEvidence(cfg.band)
            passes = band_passes(x, feats, cfg.band) if star else None
            drops, groups = duplicate_drops(rows, labels, cfg.reason, "similarity", lambda d, k: evidence.score(x, feats, rows.uid, d, k), passes)
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
            return band_passes(vectors(members), column_features(members.column(band.features)), band) if cfg.grouping == "star" else None

        def keep(table, labels, ctx):
            evidence = BandEvidence(band)

            def band_score(members, d, k, ctx):
                feats = column_features(members.column(band.features))
                return evidence.score(vectors(members), feats, members.column(schema.UID).to_numpy(), d, k)

            return evidence.enrich(duplicate_keep(cfg.reason, "similarity", band_score, band_test)(table, labels, ctx))

        verification = PairVerification(band.features, band.verify, band.mirror, FEATURE_ROW_WEIGHT)
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
        band = {} if cfg.band is None else {**verification_summary(counters), "band": [cfg.band.low, cfg.band.high], "threshold": None}
        return {
            "rows": vectors,
            **graph_summary(counters, facts, cfg.k, cfg.candidate_threshold, cfg.index),
            **band,
            "components": int(keep.get("components", 0)),
            "dropped": int(keep.get("dropped", 0)),
            "largest_group": int(keep.get("largest_group_max", 0)),
            "grouping": self.config.grouping,
        }


def band_edges(band: SimilarityBand, feats: list, src: np.ndarray, dst: np.ndarray, sim: np.ndarray) -> tuple[np.ndarray, dict]:
    """Which k-NN pairs (row indices, src < dst, rows in uid order) are edges under the band,
    and the verification counts of the summary (the same keys as the partitioned form's)."""
    keep = sim > band.high
    rejected: dict[str, int] = {}
    for i in np.flatnonzero(~keep):
        verdict = verify_pair(feats[src[i]], feats[dst[i]], band.verify, band.mirror)
        keep[i] = verdict.ok
        if not verdict.ok:
            rejected[verdict.reason] = rejected.get(verdict.reason, 0) + 1
    checked = int((sim <= band.high).sum())
    summary = {"verified_pairs": checked, "edges_geometric": int(keep[sim <= band.high].sum()),
               "edges_similarity": int((sim > band.high).sum()), "rejected": dict(sorted(rejected.items()))}
    return keep, summary


class BandEvidence:
    """The evidence between each dropped image and the image kept in its place: similarity
    above the band, a geometric verification inside it, or none directly (a chain)."""

    def __init__(self, band: SimilarityBand):
        self.band = band
        self.details: dict[int, dict] = {}

    def score(self, x: np.ndarray, feats: list, uids: np.ndarray, dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
        sims = cosine(x, dropped, kept)
        for d, k, sim in zip(dropped, kept, sims):
            if sim > self.band.high:
                self.details[int(uids[d])] = {"evidence": "similarity"}
                continue
            verdict = verify_pair(feats[d], feats[k], self.band.verify, self.band.mirror) if sim > self.band.low else None
            extra = {} if verdict is None else {"geometry": verdict.details(self.band.verify.model)}
            self.details[int(uids[d])] = {"evidence": "geometric" if verdict is not None and verdict.ok else "chain", **extra}
        return sims

    def enrich(self, drops: pa.Table) -> pa.Table:
        return merge_details(drops, self.details)


STAGE = CopyDedupStage
