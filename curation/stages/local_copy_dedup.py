"""Copy detection with local features and geometric verification, no learned weights needed.

Candidates come from a k-NN search of every image's keypoint descriptors (column written by
``local_features``): each descriptor's nearest descriptors in other images vote for image pairs
and each image proposes its ``max_candidates`` best-voted partners (``curation.dedup.
local_search``). Each candidate pair is verified with OpenCV RANSAC (``curation.dedup.geometry``:
inlier count, inlier ratio, coverage, a plausible transform); verified pairs are edges,
connected components are groups of copies, and one image per group is kept with the rule of
``copy_dedup`` (largest width*height, then smallest uid); with ``grouping: star`` an image is
dropped only when it verifies against the very image kept in its place, or through a relay
(``relay_overlap``, see ``DirectVerdicts``; ``offline.yaml``). Every
drop's details name the kept image and give the inliers and the transform found between the
dropped image and it (through the relay, named, when there is one).

Images without features (fewer than ``local_features.min_keypoints``) are counted as
``too_few_keypoints`` and left to the other dedup stages; they are never dropped here.

Single-task form: every list of the descriptor search in one process. Partitioned form:
``curation.dedup.local_steps``; with every coarse list probed both forms search exactly and
give the same drops.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.dedup.band import GeometricCheck
from curation.dedup.components import connected_components
from curation.dedup.geometry import VerifySettings
from curation.dedup.groups import duplicate_drops, rows_of
from curation.dedup.local_features import column_features
from curation.dedup.local_search import CandidateSearch, find_copies
from curation.dedup.local_steps import DirectVerdicts, PairVerification, candidate_steps, verification_summary
from curation.dedup.settings import GroupingConfig
from curation.partitioned.keepers import duplicate_keep, keep_step, members_step
from curation.partitioned.steps import ComponentsStep
from curation.stage import GlobalResult, GlobalStage, Resources


class LocalCopyDedupConfig(GroupingConfig):
    kind: Literal["local_copy_dedup"] = "local_copy_dedup"
    features: str = Field("local_features", description="features column written by a `local_features` stage")
    mirror: bool = Field(True, description="also match mirrored descriptors (RootSIFT), so horizontally flipped copies are found")
    search: CandidateSearch = Field(default_factory=CandidateSearch)
    verify: VerifySettings = Field(default_factory=VerifySettings)
    relay_overlap: float | None = Field(0.5, ge=0, le=1, description="grouping: star only: an image failing against the kept image "
                                        "is dropped in its place when it verifies against a member dropped there and this share of the "
                                        "part of that member it matches lies in the part matching the kept image; null: direct copies only")
    gpu: Literal["auto", "never", "always"] = Field("auto", description="coarse quantizer (k-means, list assignment) on a GPU when one is seen")
    reason: str = "local_copy_duplicate"


class LocalCopyDedupStage(GlobalStage):
    kind = "local_copy_dedup"
    Config = LocalCopyDedupConfig
    roles = (schema.POOL,)

    def input_columns(self):
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.features)

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def run(self, table: pa.Table) -> GlobalResult:
        cfg, t0 = self.config, time.perf_counter()
        feats_all = column_features(table.column(cfg.features))
        has = np.array([f is not None for f in feats_all], bool)
        rows = rows_of(table, has)
        feats = [f for f in feats_all if f is not None]
        found = find_copies(rows.uid, feats, table.num_rows, cfg.search, cfg.verify, cfg.mirror, self.context.seed, cfg.gpu)
        edges = np.searchsorted(rows.uid, found.edges.reshape(-1)).reshape(-1, 2)
        labels = connected_components(len(rows), edges[:, 0], edges[:, 1])
        direct = DirectVerdicts(cfg.verify, cfg.mirror, feats, rows.uid, cfg.relay_overlap)
        passes = direct.passes if cfg.grouping == "star" else None
        drops, groups = duplicate_drops(rows, labels, cfg.reason, "inliers", direct.inliers, passes)
        summary = {
            "rows": len(rows),
            "too_few_keypoints": int((~has).sum()),
            "descriptors": found.descriptors,
            "lists": found.lists,
            "candidate_pairs": len(found.pairs),
            "verified_pairs": len(found.pairs),
            "edges_geometric": len(edges),
            "edges_similarity": 0,
            "rejected": found.rejected(),
            "components": groups["groups"],
            "dropped": groups["dropped"],
            "largest_group": groups["largest_group"],
            "grouping": cfg.grouping,
            **{f"{k}_seconds": v for k, v in found.seconds.items()},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(direct.enrich(drops), summary=summary)

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        cfg = self.config
        verification = PairVerification(GeometricCheck(features=cfg.features, mirror=cfg.mirror, verify=cfg.verify), cfg.search.max_keypoints)

        def keep(table, labels, ctx):  # features decoded once per task, each pair verified once
            direct = DirectVerdicts(cfg.verify, cfg.mirror, column_features(table.column(cfg.features)), table.column(schema.UID).to_numpy(),
                                    cfg.relay_overlap)
            test = (lambda members, ctx: direct.passes) if cfg.grouping == "star" else None
            rule = duplicate_keep(cfg.reason, "inliers", lambda members, d, k, ctx: direct.inliers(d, k), test)
            return direct.enrich(rule(table, labels, ctx))

        return [
            *candidate_steps(cfg.features, cfg.search, cfg.mirror, self.context.seed, cfg.gpu),
            *verification.steps("merge/requests"),
            ComponentsStep("components", "verify/edges"),
            members_step("members", "components/labels", (cfg.features,), row_weight=cfg.search.max_keypoints),
            keep_step("keep", "members/members", keep),
        ]

    def partitioned_summary(self, counters, facts):
        keep = counters.get("keep", {})
        return {
            "rows": int(counters.get("sample", {}).get("rows_with_features", 0)),
            "too_few_keypoints": int(counters.get("sample", {}).get("too_few_keypoints", 0)),
            "descriptors": int(facts.get("quantizer", {}).get("stored", 0)),
            "lists": int(facts.get("quantizer", {}).get("lists", 1)),
            "candidate_pairs": int(counters.get("verify", {}).get("verified_pairs", 0)),
            **verification_summary(counters),
            "components": int(keep.get("components", 0)),
            "dropped": int(keep.get("dropped", 0)),
            "largest_group": int(keep.get("largest_group_max", 0)),
            "largest_list": int(counters.get("search", {}).get("list_rows_max", 0)),
            "grouping": self.config.grouping,
        }


STAGE = LocalCopyDedupStage
