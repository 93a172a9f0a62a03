"""The partitioned form shared by the binary-code stages (``phash_dedup``, ``pca_hash``).

    codes (map) -> buckets by substring (shuffle) -> pairs within the radius (reduce)
    -> connected components -> members by component (map + shuffle) -> keep rule (reduce)

The stage supplies how a group of rows becomes codes (``codes_of``) and the score its ledger
records; everything else is the same for every binary code.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from curation.dedup.multi_index import bucket_rows, key_scheme, pairs_reduce
from curation.partitioned.keepers import duplicate_keep, keep_step, members_step
from curation.partitioned.steps import ComponentsStep, MapStep, Output, ReduceStep, TaskContext

CodesOf = Callable[[pa.Table, TaskContext], tuple[np.ndarray, np.ndarray]]


def hash_dedup_steps(
    codes_of: CodesOf,
    radius: int,
    copies: int,
    method: str,
    payload: tuple[str, ...],
    reason: str,
    score: Callable[..., np.ndarray],
    columns: tuple[str, ...] | None = None,
    test: Callable | None = None,
    nbits: int = 64,
    multi_index: str = "substrings",
) -> list:
    """Steps from codes to drops. ``codes_of(table, ctx)`` gives (uids, packed codes), with a uid
    repeated for each of its ``copies`` codes (a hash and its mirror)."""

    def scheme(nbits: int = nbits):
        return key_scheme(nbits, radius, multi_index)

    def buckets(table: pa.Table, ctx: TaskContext) -> dict:
        uids, codes = codes_of(table, ctx)
        ctx.count("codes", len(uids))
        if len(uids) == 0:
            return {}
        return {"buckets": bucket_rows(uids, codes, scheme(codes.shape[1] * 8), ctx.partitions["buckets"])}

    def bucket_partitions(s) -> int:
        return s.partitions_for(s.n_rows * copies * len(scheme().keys))

    def pairs(part, ctx: TaskContext) -> dict:
        return pairs_reduce(part, ctx, radius, method, scheme)

    return [
        MapStep("buckets", buckets, [Output("buckets", bucket_partitions)], columns=columns),
        ReduceStep("pairs", "buckets/buckets", pairs,
                   [Output("edges", lambda s: s.partitions_for(s.n_rows))]),
        ComponentsStep("components", "pairs/edges"),
        members_step("members", "components/labels", payload),
        keep_step("keep", "members/members", duplicate_keep(reason, "hamming_distance", score, test)),
    ]


def hash_summary(counters: dict, nbits: int, radius: int, grouping: str, multi_index: str) -> dict:
    """The summary of a partitioned hash stage, with the single-task form's keys where they exist."""
    codes, pairs, keep = counters.get("buckets", {}), counters.get("pairs", {}), counters.get("keep", {})
    used = key_scheme(nbits, radius, multi_index)
    return {
        "codes": int(codes.get("codes", 0)),
        "edges": int(pairs.get("pairs", 0)),
        "components": int(keep.get("components", 0)),
        "dropped": int(keep.get("dropped", 0)),
        "largest_group": int(keep.get("largest_group_max", 0)),
        "radius": radius,
        "grouping": grouping,
        "index": f"multi-index hashing ({used.describe()}), partitioned",
        "keys_per_code": len(used.keys),
        "largest_bucket_partition_rows": int(pairs.get("partition_rows_max", 0)),
    }
