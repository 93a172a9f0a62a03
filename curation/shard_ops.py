"""Pure shard operations: ingest a work unit, run a map stage over a shard, emit a shard.

Each reads its inputs from the run directory, writes its outputs and ledger rows atomically and
marks the shard done; none knows about Ray. The executor (``curation.executor``) decides where
and how often they run, so a killed or retried worker only ever redoes whole shards.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.ledger import DROPPED, KEPT, LEDGER_BASE_COLUMNS, ledger_rows
from curation.metrics import record_stage_shard
from curation.stage import MapStage, Stage, StageContext, StageError, stage_class
from curation.store import RunStore, ShardView, StageRecord, write_parquet_atomic

log = logging.getLogger("curation")


def build_stage(kind: str, config: dict, context: dict) -> Stage:
    cls = stage_class(kind)
    return cls(cls.Config.model_validate(config), StageContext.from_dict(context))


@dataclass
class StageSpec:
    """Everything a worker needs to rebuild a stage and find its inputs; plain data for Ray."""

    kind: str
    config: dict
    context: dict
    record: dict
    history: list[dict]

    def stage(self) -> Stage:
        return build_stage(self.kind, self.config, self.context)

    def rec(self) -> StageRecord:
        return StageRecord(**self.record)

    def view(self, store: RunStore) -> ShardView:
        return ShardView(store, [StageRecord(**h) for h in self.history])


def count_reasons(reasons) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in reasons:
        out[r] = out.get(r, 0) + 1
    return out


def shard_stats(n_in: int, n_out: int, ledger: pa.Table, seconds: float) -> dict:
    return {"in": n_in, "out": n_out, "dropped": count_reasons(ledger.column("reason").to_pylist()), "seconds": round(seconds, 4)}


def drop_ledger(base: pa.Table, mask: pa.Array, stage_name: str, reasons: pa.Array, details: pa.Array) -> pa.Table:
    return ledger_rows(base.filter(mask), stage_name, DROPPED, reasons.filter(mask), details.filter(mask))


def role_filter(table: pa.Table, roles) -> pa.Array:
    """bool mask of the rows whose role a stage applies to."""
    return pc.fill_null(pc.is_in(table.column(schema.ROLE), value_set=pa.array(list(roles), pa.string())), False)


# ---------------------------------------------------------------------------------------------
# ingest
# ---------------------------------------------------------------------------------------------
def ingest_shard(run_dir: str, record: dict, plan_file: str, shard: int, ingest_cfg: dict) -> dict:
    """Read unit ``shard`` (from its plan file) into the ingest part and ledger of that shard."""
    from curation.config import IngestConfig
    from curation.ingest.read import read_unit
    from curation.ingest.rows import ingest_schema
    from curation.plan_files import read_plan_unit

    t0 = time.perf_counter()
    store, rec = RunStore(run_dir), StageRecord(**record)
    wu = read_plan_unit(plan_file, shard)
    cfg = IngestConfig.model_validate(ingest_cfg)
    table = read_unit(wu, cfg)
    reasons = table.column(schema.DROP_REASON)
    dropped = pc.is_valid(reasons)
    ledger = drop_ledger(table, dropped, rec.name, reasons, table.column(schema.DROP_DETAILS))
    stored = ingest_schema(cfg.extra_types())
    kept = table.filter(pc.invert(dropped)).select(stored.names).cast(stored)
    write_parquet_atomic(ledger, store.ledger_path(rec, wu.shard))
    write_parquet_atomic(kept, store.part_path(rec, wu.shard))
    stats = shard_stats(table.num_rows, kept.num_rows, ledger, time.perf_counter() - t0)
    store.mark_shard_done(rec, wu.shard, stats)
    record_stage_shard(rec.name, {**stats, "bytes": int(pc.sum(pc.binary_length(kept.column(schema.BYTES))).as_py() or 0)})
    return stats


# ---------------------------------------------------------------------------------------------
# map stages
# ---------------------------------------------------------------------------------------------
def _process_rows(stage: MapStage, rows: pa.Table, out_schema: pa.Schema) -> pa.Table:
    """Run ``stage.process``; if a batch raises, retry row by row and drop only the rows that
    still fail (reason ``stage_error``) so one bad image never stops a run."""
    try:
        return _check_output(stage, rows, stage.process(rows), out_schema)
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing rows below
        if rows.num_rows == 1:
            return _error_row(rows, out_schema, stage, batch_error)
        log.warning("stage %s: batch failed (%s); retrying row by row", stage.name, batch_error)
    pieces = []
    for i in range(rows.num_rows):
        one = rows.slice(i, 1)
        try:
            pieces.append(_check_output(stage, one, stage.process(one), out_schema))
        except Exception as e:  # noqa: BLE001
            pieces.append(_error_row(one, out_schema, stage, e))
    return pa.concat_tables(pieces)


def _check_output(stage: MapStage, rows: pa.Table, out: pa.Table, out_schema: pa.Schema) -> pa.Table:
    if out.num_rows != rows.num_rows:
        raise StageError(f"stage {stage.name} returned {out.num_rows} rows for {rows.num_rows}")
    cols = {schema.UID: rows.column(schema.UID)}
    for f in out_schema:
        if f.name not in out.column_names:
            raise StageError(f"stage {stage.name} did not return its output column {f.name!r}")
        cols[f.name] = out.column(f.name).cast(f.type)
    n = rows.num_rows
    for c in (schema.DROP_REASON, schema.DROP_DETAILS):
        cols[c] = out.column(c).cast(pa.string()) if c in out.column_names else pa.nulls(n, pa.string())
    return pa.table(cols)


def _error_row(row: pa.Table, out_schema: pa.Schema, stage: Stage, error: Exception) -> pa.Table:
    cols = {schema.UID: row.column(schema.UID)}
    for f in out_schema:
        cols[f.name] = pa.nulls(1, f.type)
    cols[schema.DROP_REASON] = pa.array(["stage_error"], pa.string())
    cols[schema.DROP_DETAILS] = pa.array([json.dumps({"stage": stage.name, "error": f"{type(error).__name__}: {error}"[:500]})])
    return pa.table(cols)


def _passthrough(passing: pa.Table, out_schema: pa.Schema) -> pa.Table:
    """Rows of other roles: replaced columns keep their value (null = unchanged, the store falls
    back to the earlier writer), new columns are null."""
    n = passing.num_rows
    cols = {schema.UID: passing.column(schema.UID)}
    for f in out_schema:
        cols[f.name] = pa.nulls(n, f.type)
    cols[schema.DROP_REASON] = pa.nulls(n, pa.string())
    cols[schema.DROP_DETAILS] = pa.nulls(n, pa.string())
    return pa.table(cols)


def map_shard(stage: MapStage, spec: StageSpec, store: RunStore, shard: int) -> dict:
    t0 = time.perf_counter()
    rec, view = spec.rec(), spec.view(store)
    out_schema = stage.output_schema()
    read_cols = list(dict.fromkeys([schema.ROLE, *LEDGER_BASE_COLUMNS, *stage.input_columns()]))
    table = view.read(shard, read_cols)
    applies = role_filter(table, stage.roles)
    todo = table.filter(applies)
    bs = max(1, stage.resources().batch_size)
    outputs = [_process_rows(stage, todo.slice(i, bs), out_schema) for i in range(0, todo.num_rows, bs)]
    result = pa.concat_tables([*outputs, _passthrough(table.filter(pc.invert(applies)), out_schema)])
    result = result.sort_by(schema.UID)
    base = table.take(pc.index_in(result.column(schema.UID), value_set=table.column(schema.UID)))
    errors = pc.sum(pc.equal(result.column(schema.DROP_REASON), "stage_error")).as_py() or 0
    if todo.num_rows >= 4 and errors == todo.num_rows:
        raise StageError(f"stage {stage.name} failed on every row of shard {shard}: {result.column(schema.DROP_DETAILS)[0]}")
    reasons = result.column(schema.DROP_REASON)
    dropped = pc.is_valid(reasons)
    ledger = drop_ledger(base, dropped, rec.name, reasons, result.column(schema.DROP_DETAILS))
    kept = result.filter(pc.invert(dropped)).select([schema.UID, *out_schema.names])
    write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    write_parquet_atomic(kept, store.part_path(rec, shard))
    stats = shard_stats(table.num_rows, kept.num_rows, ledger, time.perf_counter() - t0)
    store.mark_shard_done(rec, shard, stats)
    record_stage_shard(rec.name, stats)
    return stats


class MapShardWorker:
    """Ray Data actor: builds the stage once (``setup``) and processes whole shards."""

    def __init__(self, spec: dict, run_dir: str):
        self.spec = StageSpec(**spec)
        self.store = RunStore(run_dir)
        self.stage = self.spec.stage()
        self.stage.setup()

    def __call__(self, batch: dict) -> dict:
        stats = [map_shard(self.stage, self.spec, self.store, int(s)) for s in batch["shard"]]
        return {"shard": np.asarray(batch["shard"]), "stats": np.asarray([json.dumps(s) for s in stats])}


_worker: tuple[str, MapShardWorker] | None = None  # this process's set-up stage (task form)


def map_shards_task(batch: dict, spec: dict, run_dir: str) -> dict:
    """Task form of ``MapShardWorker`` for stages that need no GPU: the stage is set up once per
    worker process and reused by the later tasks of the same stage that Ray hands that process,
    as an actor pool would, without an actor pool's start-up and tear-down (about 2 s a stage).
    Only the latest stage is kept, so a finished stage's models are freed."""
    global _worker
    key = json.dumps([spec, run_dir], sort_keys=True, default=str)
    if _worker is None or _worker[0] != key:
        _worker = None
        _worker = (key, MapShardWorker(spec, run_dir))
    return _worker[1](batch)


# ---------------------------------------------------------------------------------------------
# emit: the "kept" ledger rows and what the output shards need to know (curation.emit writes them)
# ---------------------------------------------------------------------------------------------
def kept_mask(table: pa.Table, as_is: list[str]) -> pa.Array:
    """Rows that go into the dataset: pool images, and seeds of a dataset taken ``as_is``."""
    role = table.column(schema.ROLE)
    seed_as_is = pc.and_(pc.equal(role, schema.SEED), pc.is_in(table.column(schema.SEED_DATASET), value_set=pa.array(as_is, pa.string())))
    return pc.fill_null(pc.or_(pc.equal(role, schema.POOL), seed_as_is), False)


def emit_shard(run_dir: str, spec: dict, shard: int) -> dict:
    """Ledger rows of one shard at the end of the pipeline (kept, or ``used_as_query`` /
    ``evaluation_set``), and in its marker what the output layout needs: kept rows, per-row
    image bytes (when output shards are sized in bytes), whether any has a caption or label."""
    t0 = time.perf_counter()
    spec_ = StageSpec(**spec)
    opts = spec_.config
    store, rec, view = RunStore(run_dir), spec_.rec(), spec_.view(RunStore(run_dir))
    by_bytes = bool(opts["emit"].get("shard_bytes"))
    cols = [schema.ROLE, schema.SEED_DATASET, *LEDGER_BASE_COLUMNS, "caption", schema.LABEL, *([schema.BYTES] if by_bytes else [])]
    table = view.read(shard, cols)
    role = table.column(schema.ROLE)
    keep = kept_mask(table, opts["as_is"])
    reasons = pc.if_else(pc.equal(role, schema.EXCLUDE), pa.scalar("evaluation_set"), pa.scalar("used_as_query"))
    details = pa.array([json.dumps({"role": r}) for r in role.to_pylist()], pa.string())
    ledger_drop = drop_ledger(table, pc.invert(keep), rec.name, reasons, details)
    kept = table.filter(keep)
    ledger = pa.concat_tables([ledger_drop, ledger_rows(kept, rec.name, KEPT)]).sort_by(schema.UID)
    write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    stats = shard_stats(table.num_rows, kept.num_rows, ledger_drop, time.perf_counter() - t0)
    stats["has"] = [c for c in ("caption", schema.LABEL) if kept.column(c).null_count < kept.num_rows]
    if by_bytes:
        stats["row_bytes"] = pc.fill_null(pc.binary_length(kept.column(schema.BYTES)), 0).to_pylist()
    store.mark_shard_done(rec, shard, stats)
    record_stage_shard(rec.name, stats)
    return stats
