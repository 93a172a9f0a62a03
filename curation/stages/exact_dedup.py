"""Exact deduplication by content hash, global across shards and sources.

Among images that could be emitted (pool images and seed images taken as they are) the first
copy wins: as-is seeds before pool images, then the smallest uid (the ingest order). Seed
images used only as retrieval queries and evaluation images are deduplicated among their own
set, never against the pool, so a pool image is not lost because a query equals it.

Partitioned form: rows are hash-partitioned by content id, so all copies of an image meet in
one reduce task, which applies the same first-wins rule.
"""

from __future__ import annotations

import hashlib
from typing import Literal

import numpy as np
import pyarrow as pa

from curation import schema
from curation.partitioned.files import with_partition
from curation.partitioned.keys import partition_of
from curation.partitioned.steps import DROPS, MapStep, Output, ReduceStep
from curation.stage import GlobalResult, GlobalStage, Resources, StageConfig, make_drops

GROUP, PRIORITY = "_group", "_priority"


class ExactDedupConfig(StageConfig):
    kind: Literal["exact_dedup"] = "exact_dedup"


def id_keys(ids) -> np.ndarray:
    """A stable 64-bit key per content id (for hash partitioning)."""
    return np.array([int.from_bytes(hashlib.blake2b(str(i).encode(), digest_size=8).digest(), "little", signed=True) for i in ids], np.int64)


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

    def with_groups(self, table: pa.Table) -> pa.Table:
        groups = [self._group(r, s) for r, s in zip(table.column(schema.ROLE).to_pylist(), table.column(schema.SEED_DATASET).to_pylist())]
        return table.append_column(GROUP, pa.array([g for g, _ in groups], pa.string())).append_column(
            PRIORITY, pa.array([p for _, p in groups], pa.int8())
        )

    @staticmethod
    def first_wins(table: pa.Table) -> tuple[pa.Table, int]:
        """Drops of every copy but the first in each (group, id); and the number of distinct ones."""
        uids = table.column(schema.UID).to_numpy()
        ids = table.column(schema.ID).to_pylist()
        keys = table.column(schema.SOURCE_KEY).to_pylist()
        groups, prios = table.column(GROUP).to_pylist(), table.column(PRIORITY).to_pylist()
        order = sorted(range(len(uids)), key=lambda i: (groups[i], ids[i], prios[i], int(uids[i])))
        first: dict[tuple[str, str], int] = {}
        drop_uids, details = [], []
        for i in order:
            key = (groups[i], ids[i])
            if key not in first:
                first[key] = i
                continue
            k = first[key]
            drop_uids.append(int(uids[i]))
            details.append({"kept_uid": int(uids[k]), "kept_id": ids[k], "kept_source_key": keys[k]})
        drops = make_drops(drop_uids, ["exact_duplicate"] * len(drop_uids), details)
        return drops.sort_by(schema.UID), len(first)

    def run(self, table: pa.Table) -> GlobalResult:
        drops, unique = self.first_wins(self.with_groups(table))
        return GlobalResult(drops, summary={"unique": unique, "duplicates": drops.num_rows})

    # -- partitioned form ------------------------------------------------------------------
    def partitioned_steps(self):
        def by_id(table, ctx):
            t = self.with_groups(table).select([schema.UID, schema.ID, schema.SOURCE_KEY, GROUP, PRIORITY])
            return {"keys": with_partition(t, partition_of(id_keys(t.column(schema.ID).to_pylist()), ctx.partitions["keys"]))}

        def first(part, ctx):
            table = part.read()
            drops, unique = self.first_wins(table)
            ctx.count("unique", unique)
            ctx.count("duplicates", drops.num_rows)
            return {DROPS: with_partition(drops, ctx.groups_of_uids(drops.column(schema.UID).to_numpy()))}

        return [
            MapStep("by_id", by_id, [Output("keys", lambda s: s.partitions_for(s.n_rows))]),
            ReduceStep("first", "by_id/keys", first, [Output(DROPS, lambda s: s.n_groups)]),
        ]

    def partitioned_summary(self, counters, facts):
        c = counters.get("first", {})
        return {"unique": int(c.get("unique", 0)), "duplicates": int(c.get("duplicates", 0))}


STAGE = ExactDedupStage
