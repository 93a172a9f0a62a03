"""From component labels to drops, partitioned by component.

``members_step`` joins each group's rows with their labels (the components step writes labels
keyed by group, so the join is local) and sends every labelled row, with the columns the keep
rule and the ledger details need, to the partition of its label. ``keep_step`` then sees whole
components: it applies the stage's keep rule (``keep_fn``) and writes drops keyed by group, which
the engine turns into per-shard drop and ledger files.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.dedup.groups import Rows, duplicate_drops, rows_of
from curation.partitioned.components import LABEL
from curation.partitioned.files import with_partition
from curation.partitioned.keys import partition_of
from curation.partitioned.steps import DROPS, MapStep, Output, ReduceStep, TaskContext

MEMBERS = "members"
IDENTITY_COLUMNS = (schema.ID, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT)


def members_step(name: str, labels: str, payload: tuple[str, ...], identity=IDENTITY_COLUMNS, row_weight: int = 1) -> MapStep:
    """Map step: the labelled rows of each group, with ``identity`` and ``payload`` columns,
    keyed by the partition of their component label. ``row_weight``: how many rows' worth of
    memory one member's payload is (local features: its descriptors), to size the partitions."""
    columns = tuple(dict.fromkeys([*identity, *payload]))

    def fn(table: pa.Table, ctx: TaskContext) -> dict:
        side = ctx.side.read([schema.UID, LABEL]) if ctx.side is not None else None
        if side is None or side.num_rows == 0:
            return {}
        idx = pc.index_in(table.column(schema.UID), value_set=side.column(schema.UID))
        has = pc.is_valid(idx)
        rows = table.filter(has)
        label = side.column(LABEL).take(idx.filter(has))
        out = rows.select([schema.UID, schema.ROLE, *columns]).append_column(LABEL, label)
        ctx.count("members", out.num_rows)
        return {MEMBERS: with_partition(out, partition_of(label.to_numpy(), ctx.partitions[MEMBERS], salt=0x4C4142))}

    return MapStep(
        name,
        fn,
        [Output(MEMBERS, lambda s, ref=f"{labels}": s.partitions_for(s.dataset_rows.get(ref, 0) * row_weight))],
        columns=columns,
        side_input=labels,
    )


def keep_step(name: str, members: str, keep_fn: Callable[[pa.Table, np.ndarray, TaskContext], pa.Table]) -> ReduceStep:
    """Reduce step over whole components: ``keep_fn(members, compact_labels, ctx)`` returns the
    drops (uid, drop_reason, drop_details) of one partition's components."""

    def fn(part, ctx: TaskContext) -> dict:
        table = part.read()
        if table is None or table.num_rows == 0:
            return {}
        table = table.sort_by(schema.UID)
        _, labels = np.unique(table.column(LABEL).to_numpy(), return_inverse=True)
        drops = keep_fn(table, labels.reshape(-1), ctx)
        if drops.num_rows == 0:
            return {}
        return {DROPS: with_partition(drops, ctx.groups_of_uids(drops.column(schema.UID).to_numpy()))}

    return ReduceStep(name, members, fn, [Output(DROPS, lambda s: s.n_groups)])


def duplicate_keep(reason: str, score_name: str, score: Callable[..., np.ndarray], test: Callable | None = None):
    """The copy-deduplication keep rule (``groups.duplicate_drops``) as a ``keep_fn``:
    ``score(members, dropped_idx, kept_idx, ctx)`` gives the figure recorded for each drop;
    ``test(members, ctx)``, for ``grouping: star``, returns the stage's ``passes(kept, candidates)``."""

    def keep(table: pa.Table, labels: np.ndarray, ctx: TaskContext) -> pa.Table:
        rows: Rows = rows_of(table, np.ones(table.num_rows, bool))
        passes = test(table, ctx) if test is not None else None
        drops, summary = duplicate_drops(rows, labels, reason, score_name, lambda d, k: score(table, d, k, ctx), passes)
        ctx.count("components", summary["groups"])
        ctx.count("dropped", summary["dropped"])
        ctx.peak("largest_group", summary["largest_group"])
        return drops

    return keep
