"""Operations of a global stage that do not depend on how it was computed.

``write_global_shard`` stores one shard's share of a global stage's result (drops, ledger rows,
annotations); both execution forms use it, so their outputs are laid out identically.
``run_single_task`` is the fast path for small inputs: every row the stage applies to, read into
one task, handed to ``GlobalStage.run``.
"""

from __future__ import annotations

import time

import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.ledger import DROPPED, LEDGER_BASE_COLUMNS, ledger_rows
from curation.metrics import record_stage_shard
from curation.shard_ops import StageSpec, count_reasons, role_filter
from curation.stage import GlobalResult, GlobalStage, StageError, empty_drops
from curation.store import RunStore, StageRecord, split_by_shard, write_parquet_atomic


def empty_base() -> pa.Table:
    """uid plus the ledger columns, no rows."""
    return pa.table({schema.UID: pa.array([], pa.int64()), **{c: pa.array([], pa.string()) for c in LEDGER_BASE_COLUMNS}})


def global_input_columns(stage: GlobalStage) -> list[str]:
    return list(dict.fromkeys([schema.ROLE, *stage.input_columns()]))


def write_global_shard(
    store: RunStore,
    rec: StageRecord,
    shard: int,
    base: pa.Table,
    drops: pa.Table,
    annotations: pa.Table | None = None,
    out_schema: pa.Schema | None = None,
) -> None:
    """Write ``shard``'s drops, ledger rows and annotations. ``base`` holds uid plus the ledger
    columns of (at least) the dropped rows. Every shard gets a file, empty or not, so a re-run
    overwrites the files of an interrupted attempt instead of deleting them first."""
    drops = drops.sort_by(schema.UID) if drops.num_rows else empty_drops()
    write_parquet_atomic(drops, store.drops_path(rec, shard))
    idx = pc.index_in(drops.column(schema.UID), value_set=base.column(schema.UID))
    if pc.sum(pc.is_null(idx)).as_py():
        raise StageError(f"stage {rec.name}: shard {shard} drops uids missing from its input")
    ledger = ledger_rows(
        base.take(idx), rec.name, DROPPED, drops.column(schema.DROP_REASON), drops.column(schema.DROP_DETAILS)
    )
    write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    if out_schema is not None and len(out_schema):
        ann = annotations if annotations is not None else pa.table({schema.UID: pa.array([], pa.int64())})
        cols = {schema.UID: ann.column(schema.UID)}
        for f in out_schema:
            cols[f.name] = ann.column(f.name).cast(f.type) if f.name in ann.column_names else pa.nulls(ann.num_rows, f.type)
        write_parquet_atomic(pa.table(cols).sort_by(schema.UID), store.annotations_path(rec, shard))


def check_drops(stage_name: str, drops: pa.Table, uids: pa.Array) -> None:
    unknown = pc.sum(pc.invert(pc.is_in(drops.column(schema.UID), value_set=uids))).as_py() or 0
    if unknown:
        raise StageError(f"stage {stage_name} dropped {unknown} uids that were not in its input")
    if len(pc.unique(drops.column(schema.UID))) != drops.num_rows:
        raise StageError(f"stage {stage_name} dropped some uids twice")


def global_stats(n_in: int, drops_reasons, seconds: float, summary: dict, **extra) -> dict:
    """A global stage's marker statistics; ``drops_reasons`` is a list of reasons or their counts."""
    dropped = dict(drops_reasons) if isinstance(drops_reasons, dict) else count_reasons(drops_reasons)
    return {
        "in": n_in,
        "out": n_in - sum(dropped.values()),
        "dropped": dropped,
        "seconds": round(seconds, 4),
        "summary": summary,
        **extra,
    }


def run_single_task(spec: dict, run_dir: str, shards: list[int]) -> dict:
    """The whole stage in one task: read the rows it applies to (its ``roles``; other rows pass
    through untouched), run it, write every shard's outputs, mark the stage done."""
    t0 = time.perf_counter()
    spec_ = StageSpec(**spec)
    store, rec, view = RunStore(run_dir), spec_.rec(), spec_.view(RunStore(run_dir))
    stage = spec_.stage()
    assert isinstance(stage, GlobalStage)
    cols = list(dict.fromkeys([*LEDGER_BASE_COLUMNS, *global_input_columns(stage)]))
    parts = [view.read(s, cols) for s in shards]
    table = pa.concat_tables(parts) if parts else empty_base()
    total = table.num_rows
    table = table.filter(role_filter(table, stage.roles)).sort_by(schema.UID)
    result: GlobalResult = stage.run(table.select([schema.UID, *global_input_columns(stage)]))
    check_drops(stage.name, result.drops, table.column(schema.UID))
    base = table.select([schema.UID, *LEDGER_BASE_COLUMNS])
    drops_by_shard = split_by_shard(result.drops)
    ann_by_shard = split_by_shard(result.annotations) if result.annotations is not None else {}
    out_schema = stage.output_schema()
    for shard in shards:
        write_global_shard(
            store, rec, shard, base, drops_by_shard.get(shard, empty_drops()), ann_by_shard.get(shard), out_schema
        )
    stats = global_stats(
        total, result.drops.column(schema.DROP_REASON).to_pylist(), time.perf_counter() - t0, result.summary,
        execution="single_task", applies_to=table.num_rows,
    )
    store.mark_stage_done(rec, stats)
    record_stage_shard(rec.name, stats)
    return stats
