"""Pairs in an ambiguous band of a cheap score, settled by a geometric check of local features.

A cheap score (an SSCD cosine, a perceptual hash's Hamming distance) is sure of its best values
and unsure of its middling ones: two screenshots in one app frame, a product in two colours or
two stop signs in one font sit at pHash distance 5-6 like a re-encoded copy. ``copy_dedup`` and
the hash stages (``phash_dedup``, ``pca_hash``) therefore split their candidate pairs:

* **direct**: the score alone decides (cosine above ``band.high``, Hamming within
  ``band.accept_within``): an edge, evidence named after the score;
* **in the band**: an edge only when the two images' local features (a ``local_features`` stage)
  verify geometrically (``curation.dedup.geometry.verify_pair``), evidence ``geometric``;
* outside the candidates: never an edge.

A pair in the band where an image has no features (too few keypoints: a blank or flat graphic)
follows ``without_features``: the hash stages accept it on the hash (nothing else can see those
images), ``copy_dedup`` rejects it (its descriptor is unsure there by definition).

The same rules serve the edge filter, the star rule's test and the ledger's evidence, in both
execution forms (the partitioned verification is ``local_steps.PairVerification``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from curation import schema
from curation.dedup.geometry import Verdict, VerifySettings, verify_pair
from curation.partitioned.files import with_partition
from curation.partitioned.steps import TaskContext

Test = Callable[[int, np.ndarray], np.ndarray]  # (kept row, candidate rows) -> bool per candidate
LO, HI, SCORE, CHECK = "lo", "hi", "score", "check"  # columns of a verification request


class GeometricCheck(BaseModel):
    """Which local features settle a pair in the band, and how."""

    model_config = ConfigDict(extra="forbid")

    features: str = Field("local_features", description="features column written by a `local_features` stage")
    mirror: bool = Field(True, description="also match the mirrored image's features")
    verify: VerifySettings = Field(default_factory=VerifySettings)
    without_features: Literal["accept", "reject"] = Field(
        "reject", description="a pair in the band where an image has no features (too few keypoints): an edge or not"
    )

    def verdict(self, a, b) -> Verdict:
        """``a`` (the candidate) against ``b`` (the kept image or the pair's other side)."""
        return verify_pair(a, b, self.verify, self.mirror)

    def accepts(self, verdict: Verdict) -> bool:
        return verdict.ok or (verdict.reason == "no_features" and self.without_features == "accept")


def pair_requests(lo: np.ndarray, hi: np.ndarray, score: np.ndarray, check: np.ndarray, ctx: TaskContext) -> pa.Table:
    """Rows asking the ship step for features: one per image of each pair to ``check``, one (for
    the smaller uid only, no features needed) per pair accepted already."""
    uid = np.concatenate([lo, hi[check]])
    rows = {schema.UID: uid, LO: np.concatenate([lo, lo[check]]), HI: np.concatenate([hi, hi[check]]),
            SCORE: np.concatenate([score, score[check]]).astype(np.float32), CHECK: np.concatenate([check, check[check]])}
    table = pa.table({k: pa.array(v) for k, v in rows.items()})
    return with_partition(table, ctx.groups_of_uids(uid) if len(uid) else np.zeros(0, np.int64))


def band_edges(check: GeometricCheck, feats: list, src: np.ndarray, dst: np.ndarray, direct: np.ndarray,
               direct_name: str) -> tuple[np.ndarray, dict]:
    """Which candidate pairs (rows src < dst in uid order) are edges: ``direct`` ones, and the
    others when verified; with the summary counts (the same keys as the partitioned form's)."""
    keep = np.asarray(direct, bool).copy()
    rejected: dict[str, int] = {}
    unverifiable = 0
    for i in np.flatnonzero(~keep):
        verdict = check.verdict(feats[src[i]], feats[dst[i]])
        keep[i] = check.accepts(verdict)
        unverifiable += int(keep[i] and not verdict.ok)
        if not keep[i]:
            rejected[verdict.reason] = rejected.get(verdict.reason, 0) + 1
    checked = ~np.asarray(direct, bool)
    summary = {"verified_pairs": int(checked.sum()), "edges_geometric": int(keep[checked].sum()) - unverifiable,
               f"edges_{direct_name}": int((~checked).sum()), "rejected": dict(sorted(rejected.items()))}
    if check.without_features == "accept":
        summary["edges_without_features"] = unverifiable
    return keep, summary


def band_passes(check: GeometricCheck, feats: list, direct: Test, candidate: Test) -> Test:
    """The star rule's test: ``direct``, or a ``candidate`` that verifies against the kept image."""

    def passes(kept, cand):
        ok = np.asarray(direct(kept, cand), bool).copy()
        for i in np.flatnonzero(np.asarray(candidate(kept, cand), bool) & ~ok):
            ok[i] = check.accepts(check.verdict(feats[cand[i]], feats[kept]))
        return ok

    return passes


class BandEvidence:
    """The evidence between each dropped image and the image kept in its place: the score
    (``direct_name``), a geometric verification inside the band, or none directly (a chain)."""

    def __init__(self, check: GeometricCheck, direct_name: str):
        self.check, self.direct_name = check, direct_name
        self.details: dict[int, dict] = {}

    def record(self, feats: list, uids: np.ndarray, dropped: np.ndarray, kept: np.ndarray, direct: np.ndarray, candidate: np.ndarray) -> None:
        for d, k, is_direct, is_candidate in zip(dropped, kept, direct, candidate):
            if is_direct:
                self.details[int(uids[d])] = {"evidence": self.direct_name}
                continue
            verdict = self.check.verdict(feats[d], feats[k]) if is_candidate else None
            extra = {} if verdict is None else {"geometry": verdict.details(self.check.verify.model)}
            if verdict is not None and self.check.accepts(verdict):
                evidence = "geometric" if verdict.ok else f"{self.direct_name}_without_features"
            else:
                evidence = "chain"
            self.details[int(uids[d])] = {"evidence": evidence, **extra}

    def enrich(self, drops: pa.Table) -> pa.Table:
        return merge_details(drops, self.details)


def merge_details(drops: pa.Table, extra: dict[int, dict]) -> pa.Table:
    """``drops`` with ``extra[uid]`` merged into each row's JSON details."""
    details = [json.dumps({**json.loads(d), **extra.get(int(u), {})}, sort_keys=True)
               for u, d in zip(drops.column(schema.UID).to_pylist(), drops.column(schema.DROP_DETAILS).to_pylist())]
    return drops.set_column(drops.column_names.index(schema.DROP_DETAILS), schema.DROP_DETAILS, pa.array(details, pa.string()))
