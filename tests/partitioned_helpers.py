"""Run one global stage in both execution forms over synthetic shards in a run directory.

The shards are written as if ingest had produced them, so the stage reads them through the same
ShardView, role filter and output writers as in ``curate run``; tasks run in-process
(``InProcessTasks``) or on Ray (``RayExecutor``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation import schema
from curation.config import ExecutionConfig
from curation.executor import InProcessTasks, run_partitioned
from curation.global_ops import run_single_task
from curation.ledger import LEDGER_BASE_COLUMNS
from curation.shard_ops import StageSpec
from curation.stage import StageContext
from curation.store import INGEST, GLOBAL, RunStore, StageRecord, write_parquet_atomic


def write_run(run_dir: Path, table: pa.Table, shard_rows: int) -> StageRecord:
    """Store ``table`` (without uid) as ingest shards of ``shard_rows`` rows; uids are assigned
    as ingest does (shard << 20 | row). Missing ledger columns are filled in."""
    n = table.num_rows
    for c, default in ((schema.ID, None), (schema.ROLE, schema.POOL), (schema.SOURCE, "pool"), (schema.SOURCE_KEY, None)):
        if c not in table.column_names:
            values = [f"{c}{i}" for i in range(n)] if default is None else [default] * n
            table = table.append_column(c, pa.array(values, pa.string()))
    rec = StageRecord(0, "ingest", "ingest", INGEST, table.column_names)
    store = RunStore(run_dir)
    for shard, start in enumerate(range(0, n, shard_rows)):
        part = table.slice(start, shard_rows)
        uid = (np.int64(shard) << schema.UID_SHARD_BITS) | np.arange(part.num_rows, dtype=np.int64)
        write_parquet_atomic(pa.table({schema.UID: pa.array(uid, pa.int64()), **{c: part.column(c) for c in part.column_names}}), store.part_path(rec, shard))
        store.mark_shard_done(rec, shard, {})
    return rec


def spec_for(stage_cls, config: dict, run_dir: Path, base: StageRecord, index: int = 1, seeds=None, excludes=None, seed=0) -> StageSpec:
    cfg = stage_cls.Config.model_validate({"kind": stage_cls.kind, **config})
    rec = StageRecord(index, cfg.stage_name, cfg.kind, GLOBAL, [])
    ctx = StageContext(run_dir=run_dir, stage_dir=RunStore(run_dir).stage_dir(rec), seed=seed, seeds=seeds or {}, excludes=excludes or {})
    return StageSpec(cfg.kind, cfg.model_dump(mode="json"), ctx.to_dict(), rec.to_dict(), [base.to_dict()])


def drops_of(run_dir: Path, spec: StageSpec) -> pa.Table:
    store = RunStore(run_dir)
    files = sorted((store.stage_dir(spec.rec()) / "drops").glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by(schema.UID)


def ledger_of(run_dir: Path, spec: StageSpec) -> pa.Table:
    store = RunStore(run_dir)
    files = sorted(store.ledger_dir(spec.rec()).glob("*.parquet"))
    return pa.concat_tables([pq.read_table(f) for f in files]).sort_by(schema.UID)


def run_single(run_dir: Path, spec: StageSpec) -> dict:
    shards = spec.view(RunStore(run_dir)).shards()
    return run_single_task(spec.__dict__, str(run_dir), shards)


def run_parted(run_dir: Path, spec: StageSpec, tasks=None, **execution) -> dict:
    store = RunStore(run_dir)
    shards = spec.view(store).shards()
    ex = ExecutionConfig(global_stages="partitioned", **execution)
    return run_partitioned(spec.stage(), spec, store, ex, tasks or InProcessTasks(), shards)


def both_forms(tmp_path: Path, table: pa.Table, stage_cls, config: dict, shard_rows: int, **execution):
    """(single-task stats, drops, ledger), (partitioned stats, drops, ledger) on the same input."""
    out = []
    for form in ("single", "partitioned"):
        run_dir = tmp_path / form
        base = write_run(run_dir, table, shard_rows)
        spec = spec_for(stage_cls, config, run_dir, base)
        stats = run_single(run_dir, spec) if form == "single" else run_parted(run_dir, spec, **execution)
        out.append((stats, drops_of(run_dir, spec), ledger_of(run_dir, spec)))
    return out


__all__ = ["LEDGER_BASE_COLUMNS", "both_forms", "drops_of", "ledger_of", "run_parted", "run_single", "spec_for", "write_run"]
