"""A hash stage's pairs beyond ``accept_within`` bits, verified with local features.

At pHash radius 6 a re-encoded, resized or recoloured copy and a look-alike (two screenshots in
one app frame, a chair in two paints, two clip-art stop signs) are equally near. Pairs within
``accept_within`` bits are copies on the hash alone; pairs farther out, up to the stage's
radius, become edges only when the images' local features verify geometrically
(``curation.dedup.band``). Images without features (too few keypoints) keep the hash's verdict:
no other stage can see them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from curation.dedup.band import BandEvidence, GeometricCheck, Test, band_edges, band_passes
from curation.dedup.binary import distinct_pairs

Distance = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, rows) -> Hamming distance per pair


class HashBand(GeometricCheck):
    """Hash pairs farther apart than ``accept_within`` bits are verified with local features."""

    accept_within: int = Field(2, ge=0, le=255, description="largest Hamming distance accepted on the hash alone")
    without_features: Literal["accept", "reject"] = Field(
        "accept", description="a pair to verify where an image has too few keypoints: an edge on the hash alone, or not"
    )


@dataclass
class HashBandRule:
    """The band's decisions over one set of rows: every row (single task) or one partition's
    components (the keep step). ``within(radius)`` is the stage's star test at that radius."""

    band: HashBand
    radius: int
    feats: list
    uids: np.ndarray
    distance: Distance
    within: Callable[[int], Test]

    def edges(self, lo: np.ndarray, hi: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
        """The edges among the candidate pairs (``band_candidates``), and the verification summary."""
        keep, summary = band_edges(self.band, self.feats, lo, hi, distance <= self.band.accept_within, "hash")
        return lo[keep], hi[keep], summary

    def passes(self) -> Test:
        return band_passes(self.band, self.feats, self.within(self.band.accept_within), self.within(self.radius))

    def score(self, evidence: BandEvidence) -> Distance:
        """The ledger's Hamming distance of each drop to its kept image, recording the evidence."""

        def score(dropped: np.ndarray, kept: np.ndarray) -> np.ndarray:
            d = self.distance(dropped, kept)
            evidence.record(self.feats, self.uids, dropped, kept, d <= self.band.accept_within, d <= self.radius)
            return d

        return score

    def single_task(self, codes: np.ndarray, row_of: np.ndarray, method: str, star: bool) -> "BandedEdges":
        """The single-task form over every row: the candidates (``band_candidates``), the edges
        among them, and the keep rule's score and star test with the evidence they record."""
        lo, hi, distance, used = band_candidates(codes, row_of, self.uids, self.radius, method)
        i, j, summary = self.edges(lo, hi, distance)
        summary.update({"candidate_pairs": int(len(lo)), "accept_within": self.band.accept_within})
        evidence = BandEvidence(self.band, "hash")
        return BandedEdges(i, j, used, summary, self.score(evidence), self.passes() if star else None, evidence)


@dataclass
class BandedEdges:
    """A hash stage's edges under its band (single task), and what its keep rule needs."""

    i: np.ndarray
    j: np.ndarray
    index: str
    summary: dict
    score: Distance
    passes: Test | None
    evidence: BandEvidence


def band_candidates(codes: np.ndarray, row_of: np.ndarray, uids: np.ndarray, radius: int, method: str) -> tuple:
    """The pairs a band verifies, as the partitioned form finds them (``multi_index.pairs_reduce``):
    identical codes link to their smallest uid (distance 0), and each pair of distinct codes
    within ``radius`` links the smallest uids of the two; one row per (smaller uid, larger uid)
    with the smallest distance found. ``codes[m]`` belongs to row ``row_of[m]`` (a hash and its
    mirror: two codes per row). Returns (lo rows, hi rows, distance, index used)."""
    codes = np.ascontiguousarray(codes, np.uint8)
    empty = np.zeros(0, np.int64)
    if len(codes) == 0:
        return empty, empty, empty, "none"
    view = codes.view(np.dtype((np.void, codes.shape[1]))).ravel()
    _, first, inverse = np.unique(view, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    rep_uid = np.full(len(first), np.iinfo(np.int64).max, np.int64)
    np.minimum.at(rep_uid, inverse, uids[row_of])
    by_uid = np.argsort(uids, kind="stable")
    rep_row = by_uid[np.searchsorted(uids[by_uid], rep_uid)]
    di, dj, dd, used = distinct_pairs(codes[first], radius, method)
    a = np.concatenate([rep_row[inverse], rep_row[di]])
    b = np.concatenate([np.asarray(row_of, np.int64), rep_row[dj]])
    d = np.concatenate([np.zeros(len(row_of), np.int64), dd])
    keep = a != b
    a, b, d = a[keep], b[keep], d[keep]
    swap = uids[a] > uids[b]
    lo, hi = np.where(swap, b, a), np.where(swap, a, b)
    order = np.lexsort((d, hi, lo))
    lo, hi, d = lo[order], hi[order], d[order]
    firsts = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])] if len(lo) else np.zeros(0, bool)
    return lo[firsts], hi[firsts], d[firsts], used
