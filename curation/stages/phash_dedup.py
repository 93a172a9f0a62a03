"""Near-duplicate removal by perceptual-hash Hamming radius.

Pool images whose hashes differ in at most ``radius`` bits (also against the mirrored image's
hash when ``flip`` is on) are linked; linked images form groups (connected components) and one
image per group is kept: the largest width*height, ties by the smallest uid. Seed and
evaluation images are never removed here (the stage's roles are pool only).

Single-task form: FAISS binary range search over every hash (exact brute force for small N,
multi-index hashing for large N). Partitioned form: multi-index hashing as a shuffle
(``curation.dedup.multi_index``), exact as well, so both give the same drops.
"""

from __future__ import annotations

import time
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.dedup.binary import hamming, hamming_pairs, uint64_to_codes, within_radius
from curation.dedup.components import connected_components
from curation.dedup.groups import duplicate_drops, rows_of
from curation.dedup.hash_band import HashBandRule
from curation.dedup.local_features import column_features
from curation.dedup.hash_steps import hash_dedup_steps, hash_summary
from curation.dedup.settings import HashDedupConfig
from curation.stage import GlobalResult, GlobalStage, Resources
from curation.stages.phash import flip_column


class PhashDedupConfig(HashDedupConfig):
    kind: Literal["phash_dedup"] = "phash_dedup"
    column: str = Field("phash", description="uint64 hash column written by a `phash` stage")
    radius: int = Field(6, ge=0, le=32, description="largest Hamming distance (of 64 bits) counted as a duplicate")
    flip: bool = Field(True, description="also match against mirrored hashes (`<column>_flip`, written by `phash` with flip: true)")
    index: Literal["auto", "flat", "multihash"] = Field("auto", description="binary index: exact flat, multi-index hashing, or by N")
    reason: str = "phash_duplicate"


class PhashDedupStage(GlobalStage):
    kind = "phash_dedup"
    Config = PhashDedupConfig
    roles = (schema.POOL,)

    def input_columns(self):
        band = (self.config.band.features,) if self.config.band else ()
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, *self._hash_columns(), *band)

    def _hash_columns(self) -> tuple[str, ...]:
        return (self.config.column, flip_column(self.config.column)) if self.config.flip else (self.config.column,)

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def _hashed(self, table: pa.Table) -> tuple[np.ndarray, list[np.ndarray]]:
        """Mask of rows with every hash column, and those columns as packed codes."""
        mask = np.ones(table.num_rows, bool)
        for c in self._hash_columns():
            mask &= table.column(c).is_valid().to_numpy(zero_copy_only=False)
        keep = pa.array(mask)
        codes = [uint64_to_codes(table.column(c).filter(keep).to_numpy().astype(np.uint64)) for c in self._hash_columns()]
        return mask, codes

    def distance(self, codes: np.ndarray, flipped: np.ndarray | None, d, k) -> np.ndarray:
        """Hamming distance between rows d and k as the stage links them: the smallest over the
        hashes and, with ``flip``, the mirrored hashes of either side."""
        best = hamming(codes[d], codes[k])
        if flipped is None:
            return best
        for a, b in ((codes[d], flipped[k]), (flipped[d], codes[k]), (flipped[d], flipped[k])):
            best = np.minimum(best, hamming(a, b))
        return best

    def _passes(self, codes: np.ndarray, flipped: np.ndarray | None):
        """The star rule's test: within the radius of the kept image."""
        if self.config.grouping != "star":
            return None
        return self._within(codes, flipped)(self.config.radius)

    def _within(self, codes: np.ndarray, flipped: np.ndarray | None):
        """radius -> the star test at that radius (any mirror combination)."""
        return lambda radius: self._within_radius(codes, flipped, radius)

    def _within_radius(self, codes: np.ndarray, flipped: np.ndarray | None, radius: int):
        pairs = [(codes, codes)] if flipped is None else [(codes, codes), (codes, flipped), (flipped, codes), (flipped, flipped)]
        tests = [within_radius(a, radius, b) for a, b in pairs]

        def passes(kept: int, cand: np.ndarray) -> np.ndarray:
            hit = tests[0](kept, cand)
            for t in tests[1:]:
                hit |= t(kept, cand)
            return hit

        return passes

    def run(self, table: pa.Table) -> GlobalResult:
        t0 = time.perf_counter()
        mask, codes = self._hashed(table)
        rows = rows_of(table, mask)
        n = len(rows)
        searched = np.vstack(codes)  # with flip, rows n..2n-1 are the mirrors of rows 0..n-1
        flipped = codes[1] if self.config.flip else None
        score = lambda d, k: self.distance(codes[0], flipped, d, k)  # noqa: E731
        passes, band, evidence = self._passes(codes[0], flipped), {}, None
        if self.config.band is None:
            i, j, _, method = hamming_pairs(searched, self.config.radius, self.config.index)
            i, j = (i % n, j % n) if n else (i, j)
        else:
            rule = self._band_rule(table.filter(pa.array(mask)), rows.uid, codes[0], flipped)
            g = rule.single_task(searched, np.tile(np.arange(n), len(codes)), self.config.index, star=passes is not None)
            i, j, method, band, score, passes, evidence = g.i, g.j, g.index, g.summary, g.score, g.passes, g.evidence
        labels = connected_components(n, i, j)
        drops, counts = duplicate_drops(rows, labels, self.config.reason, "hamming_distance", score, passes)
        if evidence is not None:
            drops = evidence.enrich(drops)
        summary = {
            "rows": int(n),
            "skipped_no_hash": int((~mask).sum()),
            "edges": int((i != j).sum()),
            **band,
            "components": counts["groups"],
            "dropped": counts["dropped"],
            "largest_group": counts["largest_group"],
            "index": method,
            "grouping": self.config.grouping,
            "radius": self.config.radius,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(drops, summary=summary)

    def _band_rule(self, members: pa.Table, uids: np.ndarray, codes: np.ndarray, flipped: np.ndarray | None) -> HashBandRule:
        return HashBandRule(self.config.band, self.config.radius, column_features(members.column(self.config.band.features)), uids,
                            lambda d, k: self.distance(codes, flipped, d, k), self._within(codes, flipped))

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        def codes_of(table, ctx):
            mask, codes = self._hashed(table)
            uids = table.column(schema.UID).to_numpy()[mask]
            ctx.count("skipped_no_hash", int((~mask).sum()))
            return np.tile(uids, len(codes)), np.vstack(codes)

        def member_codes(members: pa.Table):
            codes = [uint64_to_codes(members.column(c).to_numpy().astype(np.uint64)) for c in self._hash_columns()]
            return codes[0], (codes[1] if self.config.flip else None)

        def score(members: pa.Table, d, k, ctx):
            return self.distance(*member_codes(members), d, k)

        def test(members: pa.Table, ctx):
            return self._passes(*member_codes(members))

        def band_rule(members: pa.Table, ctx):
            return self._band_rule(members, members.column(schema.UID).to_numpy(), *member_codes(members))

        return hash_dedup_steps(
            codes_of, self.config.radius, len(self._hash_columns()), self.config.index, self._hash_columns(), self.config.reason,
            score, test=test, nbits=64, multi_index=self.config.buckets, band=self.config.band, band_rule=band_rule,
        )

    def partitioned_summary(self, counters, facts):
        summary = hash_summary(counters, 64, self.config.radius, self.config.grouping, self.config.buckets, self.config.band)
        summary["skipped_no_hash"] = int(counters.get("buckets", {}).get("skipped_no_hash", 0))
        return summary


STAGE = PhashDedupStage
