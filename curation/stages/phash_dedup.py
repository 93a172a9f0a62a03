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
from curation.dedup.binary import hamming, hamming_pairs, uint64_to_codes
from curation.dedup.components import connected_components
from curation.dedup.groups import duplicate_drops, rows_of
from curation.dedup.hash_steps import hash_dedup_steps, hash_summary
from curation.dedup.settings import DedupStageConfig
from curation.stage import GlobalResult, GlobalStage, Resources
from curation.stages.phash import flip_column


class PhashDedupConfig(DedupStageConfig):
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
        return (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, *self._hash_columns())

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
        """Hamming distance of dropped rows to their kept rows, the mirror included."""
        best = hamming(codes[d], codes[k])
        return np.minimum(best, hamming(codes[d], flipped[k])) if flipped is not None else best

    def run(self, table: pa.Table) -> GlobalResult:
        t0 = time.perf_counter()
        mask, codes = self._hashed(table)
        rows = rows_of(table, mask)
        n = len(rows)
        searched = np.vstack(codes)  # with flip, rows n..2n-1 are the mirrors of rows 0..n-1
        i, j, _, method = hamming_pairs(searched, self.config.radius, self.config.index)
        if n:
            i, j = i % n, j % n
        labels = connected_components(n, i, j)
        flipped = codes[1] if self.config.flip else None
        drops, counts = duplicate_drops(
            rows, labels, self.config.reason, "hamming_distance", lambda d, k: self.distance(codes[0], flipped, d, k)
        )
        summary = {
            "rows": int(n),
            "skipped_no_hash": int((~mask).sum()),
            "edges": int((i != j).sum()),
            "components": counts["groups"],
            "dropped": counts["dropped"],
            "largest_group": counts["largest_group"],
            "index": method,
            "radius": self.config.radius,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(drops, summary=summary)

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        def codes_of(table, ctx):
            mask, codes = self._hashed(table)
            uids = table.column(schema.UID).to_numpy()[mask]
            ctx.count("skipped_no_hash", int((~mask).sum()))
            return np.tile(uids, len(codes)), np.vstack(codes)

        def score(members: pa.Table, d, k, ctx):
            codes = [uint64_to_codes(members.column(c).to_numpy().astype(np.uint64)) for c in self._hash_columns()]
            return self.distance(codes[0], codes[1] if self.config.flip else None, d, k)

        return hash_dedup_steps(
            codes_of, self.config.radius, len(self._hash_columns()), self.config.index, self._hash_columns(), self.config.reason, score
        )

    def partitioned_summary(self, counters, facts):
        summary = hash_summary(counters, 64, self.config.radius)
        summary["skipped_no_hash"] = int(counters.get("buckets", {}).get("skipped_no_hash", 0))
        return summary


STAGE = PhashDedupStage
