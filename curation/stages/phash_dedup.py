"""Near-duplicate removal by perceptual-hash Hamming radius.

Pool images whose hashes differ in at most ``radius`` bits (also against the mirrored image's
hash when ``flip`` is on) are linked (FAISS binary range search: exact brute force for small N,
multi-index hashing for large N); linked images form
groups (connected components) and one image per group is kept: the largest width*height, ties
by the smallest uid. Seed and evaluation images are never removed here.
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
from curation.dedup.groups import duplicate_drops, role_mask, rows_of
from curation.stages.phash import flip_column
from curation.dedup.settings import DedupStageConfig
from curation.stage import GlobalResult, GlobalStage, Resources


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
        cols = (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, self.config.column)
        return cols + ((flip_column(self.config.column),) if self.config.flip else ())

    def resources(self) -> Resources:
        return Resources(num_cpus=self.config.num_cpus)

    def run(self, table: pa.Table) -> GlobalResult:
        t0 = time.perf_counter()
        hashes = table.column(self.config.column)
        is_pool = role_mask(table, schema.POOL)
        mask = is_pool & hashes.is_valid().to_numpy(zero_copy_only=False)
        if self.config.flip:
            mask &= table.column(flip_column(self.config.column)).is_valid().to_numpy(zero_copy_only=False)
        rows = rows_of(table, mask)
        n = len(rows)
        codes = uint64_to_codes(hashes.filter(pa.array(mask)).to_numpy().astype(np.uint64))
        searched = codes
        if self.config.flip:  # rows n..2n-1 are the mirrored hashes of rows 0..n-1
            flipped = uint64_to_codes(table.column(flip_column(self.config.column)).filter(pa.array(mask)).to_numpy().astype(np.uint64))
            searched = np.vstack([codes, flipped])
        i, j, _, method = hamming_pairs(searched, self.config.radius, self.config.index)
        if n:
            i, j = i % n, j % n
        labels = connected_components(n, i, j)

        def distance(d, k):
            best = hamming(codes[d], codes[k])
            return np.minimum(best, hamming(codes[d], flipped[k])) if self.config.flip else best

        drops, counts = duplicate_drops(rows, labels, self.config.reason, "hamming_distance", distance)
        summary = {
            "rows": int(len(rows)),
            "skipped_not_pool": int((~is_pool).sum()),
            "skipped_no_hash": int((is_pool & ~mask).sum()),
            "edges": int((i != j).sum()),
            "components": counts["groups"],
            "dropped": counts["dropped"],
            "largest_group": counts["largest_group"],
            "index": method,
            "radius": self.config.radius,
            "seconds": round(time.perf_counter() - t0, 3),
        }
        return GlobalResult(drops, summary=summary)


STAGE = PhashDedupStage
