"""The partitioned form shared by the binary-code stages (``phash_dedup``, ``pca_hash``).

    codes (map) -> buckets by substring (shuffle) -> pairs within the radius (reduce)
    -> connected components -> members by component (map + shuffle) -> keep rule (reduce)

The stage supplies how a group of rows becomes codes (``codes_of``) and the score its ledger
records; everything else is the same for every binary code. With a hash band
(``curation.dedup.hash_band``) the pairs step writes verification requests instead of edges,
and the pairs beyond ``accept_within`` are verified with local features before the components:

    ... -> requests (reduce) -> ship features (map) -> verify (reduce) -> components -> ...
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa

from curation.dedup.band import BandEvidence
from curation.dedup.hash_band import HashBand, HashBandRule
from curation.dedup.local_steps import FEATURE_ROW_WEIGHT, PairVerification, verification_summary
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
    band: HashBand | None = None,
    band_rule: Callable[[pa.Table, TaskContext], HashBandRule] | None = None,
) -> list:
    """Steps from codes to drops. ``codes_of(table, ctx)`` gives (uids, packed codes), with a uid
    repeated for each of its ``copies`` codes (a hash and its mirror). With ``band``,
    ``band_rule(members, ctx)`` gives the band's decisions over one partition's components."""

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
        return pairs_reduce(part, ctx, radius, method, scheme, None if band is None else band.accept_within)

    buckets_step = MapStep("buckets", buckets, [Output("buckets", bucket_partitions)], columns=columns)
    if band is None:
        return [
            buckets_step,
            ReduceStep("pairs", "buckets/buckets", pairs, [Output("edges", lambda s: s.partitions_for(s.n_rows))]),
            ComponentsStep("components", "pairs/edges"),
            members_step("members", "components/labels", payload),
            keep_step("keep", "members/members", duplicate_keep(reason, "hamming_distance", score, test)),
        ]

    def keep(members: pa.Table, labels: np.ndarray, ctx: TaskContext) -> pa.Table:
        rule, evidence = band_rule(members, ctx), BandEvidence(band, "hash")
        star = test is not None and test(members, ctx) is not None
        score_of = rule.score(evidence)
        banded = duplicate_keep(reason, "hamming_distance", lambda m, d, k, c: score_of(d, k), (lambda m, c: rule.passes()) if star else None)
        return evidence.enrich(banded(members, labels, ctx))

    return [
        buckets_step,
        ReduceStep("pairs", "buckets/buckets", pairs, [Output("requests", lambda s: s.n_groups)]),
        *PairVerification(band, FEATURE_ROW_WEIGHT, "hash").steps("pairs/requests"),
        ComponentsStep("components", "verify/edges"),
        members_step("members", "components/labels", (*payload, band.features), row_weight=FEATURE_ROW_WEIGHT),
        keep_step("keep", "members/members", keep),
    ]


def hash_summary(counters: dict, nbits: int, radius: int, grouping: str, multi_index: str, band: HashBand | None = None) -> dict:
    """The summary of a partitioned hash stage, with the single-task form's keys where they exist."""
    codes, pairs, keep = counters.get("buckets", {}), counters.get("pairs", {}), counters.get("keep", {})
    used = key_scheme(nbits, radius, multi_index)
    return {
        "codes": int(codes.get("codes", 0)),
        "edges": int(pairs.get("pairs", 0)),
        **({} if band is None else {**verification_summary(counters, "hash", band.without_features), "accept_within": band.accept_within}),
        "components": int(keep.get("components", 0)),
        "dropped": int(keep.get("dropped", 0)),
        "largest_group": int(keep.get("largest_group_max", 0)),
        "radius": radius,
        "grouping": grouping,
        "index": f"multi-index hashing ({used.describe()}), partitioned",
        "keys_per_code": len(used.keys),
        "largest_bucket_partition_rows": int(pairs.get("partition_rows_max", 0)),
    }
