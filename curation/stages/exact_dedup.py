"""Exact deduplication by content hash, global across shards and sources.

Among images that could be emitted (pool images and seed images taken as they are) the first
copy wins: as-is seeds before pool images, then the smallest uid (the ingest order). Seed
images used only as retrieval queries and evaluation images are deduplicated among their own
set, never against the pool, so a pool image is not lost because a query equals it.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import pyarrow as pa

from curation import schema
from curation.stage import GlobalResult, GlobalStage, Resources, StageConfig, make_drops


class ExactDedupConfig(StageConfig):
    kind: Literal["exact_dedup"] = "exact_dedup"


class ExactDedupStage(GlobalStage):
    kind = "exact_dedup"
    Config = ExactDedupConfig

    def input_columns(self):
        return (schema.ID, schema.SEED_DATASET, schema.SOURCE_KEY)

    def resources(self) -> Resources:
        return Resources(num_cpus=1)

    def _group(self, role: str, seed_dataset: str | None) -> tuple[str, int]:
        """(dedup group, priority within it): lower priority wins."""
        if role == schema.POOL:
            return "emit", 1
        if role == schema.SEED:
            recipes = self.context.seeds.get(seed_dataset or "", {}).get("recipes", [])
            if any(r.get("method") == "as_is" for r in recipes):
                return "emit", 0
            return f"query:{seed_dataset}", 0
        return f"exclude:{seed_dataset}", 0

    def run(self, table: pa.Table) -> GlobalResult:
        uids = table.column(schema.UID).to_numpy()
        ids = table.column(schema.ID).to_pylist()
        roles = table.column(schema.ROLE).to_pylist()
        seeds = table.column(schema.SEED_DATASET).to_pylist()
        keys = table.column(schema.SOURCE_KEY).to_pylist()
        groups = [self._group(r, s) for r, s in zip(roles, seeds)]
        order = sorted(range(len(uids)), key=lambda i: (groups[i][0], ids[i], groups[i][1], int(uids[i])))
        first: dict[tuple[str, str], int] = {}
        drop_uids, details = [], []
        for i in order:
            key = (groups[i][0], ids[i])
            if key not in first:
                first[key] = i
                continue
            k = first[key]
            drop_uids.append(int(uids[i]))
            details.append({"kept_uid": int(uids[k]), "kept_id": ids[k], "kept_source_key": keys[k]})
        if drop_uids:
            order2 = np.argsort(drop_uids)
            drop_uids = [drop_uids[j] for j in order2]
            details = [details[j] for j in order2]
        drops = make_drops(drop_uids, ["exact_duplicate"] * len(drop_uids), details)
        return GlobalResult(drops, summary={"unique": len(first), "duplicates": len(drop_uids)})


STAGE = ExactDedupStage
