"""Run a pipeline: plan ingestion, execute stages on Ray over Parquet shards, emit, manifest.

Per-shard work (ingest, map stages, emit) goes through Ray Data: a dataset of pending shard
numbers is mapped by tasks or by an actor pool with the stage's declared resources, and every
worker reads its shard from the run directory and writes its outputs back atomically. Global
stages run as one Ray task. Completed shards and stages carry markers, so a re-run of the same
command resumes where the last one stopped and produces the same output.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.catalog import ResolvedSet, resolve_excludes, resolve_seeds
from curation.config import PipelineConfig
from curation.ledger import DROPPED, KEPT, LEDGER_BASE_COLUMNS, ledger_rows
from curation.metrics import record_stage_shard
from curation.stage import GlobalStage, MapStage, Stage, StageContext, StageError, stage_class
from curation.store import (
    GLOBAL,
    INGEST,
    MAP,
    RunStore,
    ShardView,
    StageRecord,
    read_json,
    split_by_shard,
    write_json_atomic,
    write_parquet_atomic,
)

log = logging.getLogger("curation")

FORMAT_VERSION = "curation.manifest/1"


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


@dataclass
class RunRequest:
    pools: list[str]
    out: Path
    config: PipelineConfig
    seeds: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    address: str | None = None
    resume: bool = False
    allow_missing_weights: bool = False
    progress: bool = True  # Ray Data's console progress bars


# ---------------------------------------------------------------------------------------------
# Stage construction (driver and workers build stages the same way)
# ---------------------------------------------------------------------------------------------
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


# ---------------------------------------------------------------------------------------------
# Per-shard work, executed inside Ray workers
# ---------------------------------------------------------------------------------------------
def _drop_ledger(base: pa.Table, mask: pa.Array, stage_name: str, reasons: pa.Array, details: pa.Array) -> pa.Table:
    return ledger_rows(base.filter(mask), stage_name, DROPPED, reasons.filter(mask), details.filter(mask))


def ingest_shard(run_dir: str, record: dict, unit: dict, ingest_cfg: dict) -> dict:
    from curation.config import IngestConfig
    from curation.ingest.plan import WorkUnit
    from curation.ingest.read import read_unit

    t0 = time.perf_counter()
    store, rec = RunStore(run_dir), StageRecord(**record)
    wu = WorkUnit.from_dict(unit)
    table = read_unit(wu, IngestConfig.model_validate(ingest_cfg))
    reasons = table.column(schema.DROP_REASON)
    dropped = pc.is_valid(reasons)
    ledger = _drop_ledger(table, dropped, rec.name, reasons, table.column(schema.DROP_DETAILS))
    kept = table.filter(pc.invert(dropped)).select(schema.INGEST_SCHEMA.names).cast(schema.INGEST_SCHEMA)
    write_parquet_atomic(ledger, store.ledger_path(rec, wu.shard))
    write_parquet_atomic(kept, store.part_path(rec, wu.shard))
    stats = _stats(table.num_rows, kept.num_rows, ledger, time.perf_counter() - t0)
    store.mark_shard_done(rec, wu.shard, stats)
    record_stage_shard(rec.name, {**stats, "bytes": int(pc.sum(pc.binary_length(kept.column(schema.BYTES))).as_py() or 0)})
    return stats


def _stats(n_in: int, n_out: int, ledger: pa.Table, seconds: float) -> dict:
    dropped: dict[str, int] = {}
    for r in ledger.column("reason").to_pylist():
        dropped[r] = dropped.get(r, 0) + 1
    return {"in": n_in, "out": n_out, "dropped": dropped, "seconds": round(seconds, 4)}


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


def map_shard(stage: MapStage, spec: StageSpec, store: RunStore, shard: int) -> dict:
    t0 = time.perf_counter()
    rec, view = spec.rec(), spec.view(store)
    out_schema = stage.output_schema()
    read_cols = list(dict.fromkeys([schema.ROLE, *LEDGER_BASE_COLUMNS, *stage.input_columns()]))
    table = view.read(shard, read_cols)
    applies = pc.is_in(table.column(schema.ROLE), value_set=pa.array(list(stage.roles), pa.string()))
    todo = table.filter(applies)
    bs = max(1, stage.resources().batch_size)
    outputs = [_process_rows(stage, todo.slice(i, bs), out_schema) for i in range(0, todo.num_rows, bs)]
    # Rows of other roles pass through: replaced columns keep their value, new ones are null.
    passing = table.filter(pc.invert(applies))
    pass_cols = {schema.UID: passing.column(schema.UID)}
    for f in out_schema:  # null = unchanged for a replaced column (the store falls back)
        pass_cols[f.name] = pa.nulls(passing.num_rows, f.type)
    pass_cols[schema.DROP_REASON] = pa.nulls(passing.num_rows, pa.string())
    pass_cols[schema.DROP_DETAILS] = pa.nulls(passing.num_rows, pa.string())
    result = pa.concat_tables([*outputs, pa.table(pass_cols)]) if outputs else pa.table(pass_cols)
    result = result.sort_by(schema.UID)
    order = pc.index_in(result.column(schema.UID), value_set=table.column(schema.UID))
    base = table.take(order)
    errors = pc.sum(pc.equal(result.column(schema.DROP_REASON), "stage_error")).as_py() or 0
    if todo.num_rows >= 4 and errors == todo.num_rows:
        raise StageError(f"stage {stage.name} failed on every row of shard {shard}: {result.column(schema.DROP_DETAILS)[0]}")
    reasons = result.column(schema.DROP_REASON)
    dropped = pc.is_valid(reasons)
    ledger = _drop_ledger(base, dropped, rec.name, reasons, result.column(schema.DROP_DETAILS))
    kept = result.filter(pc.invert(dropped)).select([schema.UID, *out_schema.names])
    write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    write_parquet_atomic(kept, store.part_path(rec, shard))
    stats = _stats(table.num_rows, kept.num_rows, ledger, time.perf_counter() - t0)
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


def run_global(spec: dict, run_dir: str, shards: list[int]) -> dict:
    t0 = time.perf_counter()
    spec_ = StageSpec(**spec)
    store, rec, view = RunStore(run_dir), spec_.rec(), spec_.view(RunStore(run_dir))
    stage = spec_.stage()
    assert isinstance(stage, GlobalStage)
    cols = list(dict.fromkeys([schema.ROLE, *LEDGER_BASE_COLUMNS, *stage.input_columns()]))
    parts = [view.read(s, cols) for s in shards]
    table = pa.concat_tables(parts) if parts else pa.table({schema.UID: pa.array([], pa.int64())})
    table = table.sort_by(schema.UID)
    result = stage.run(table.select([schema.UID, *dict.fromkeys([schema.ROLE, *stage.input_columns()])]))
    drops = result.drops
    unknown = pc.sum(pc.invert(pc.is_in(drops.column(schema.UID), value_set=table.column(schema.UID)))).as_py() or 0
    if unknown:
        raise StageError(f"stage {stage.name} dropped {unknown} uids that were not in its input")
    if len(pc.unique(drops.column(schema.UID))) != drops.num_rows:
        raise StageError(f"stage {stage.name} dropped some uids twice")
    # Clear a previous, interrupted attempt before writing.
    for d in (store.stage_dir(rec), store.ledger_dir(rec)):
        for f in d.rglob("*.parquet") if d.exists() else []:
            f.unlink()
    base = table.select([schema.UID, *LEDGER_BASE_COLUMNS])
    for shard, part in split_by_shard(drops).items():
        write_parquet_atomic(part, store.drops_path(rec, shard))
        idx = pc.index_in(part.column(schema.UID), value_set=base.column(schema.UID))
        ledger = ledger_rows(
            base.take(idx), rec.name, DROPPED, part.column(schema.DROP_REASON), part.column(schema.DROP_DETAILS)
        )
        write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    if result.annotations is not None:
        out_schema = stage.output_schema()
        ann = result.annotations.select([schema.UID, *out_schema.names])
        ann = pa.table({schema.UID: ann.column(schema.UID), **{f.name: ann.column(f.name).cast(f.type) for f in out_schema}})
        by_shard = split_by_shard(ann)
        for shard in shards:  # every shard gets a file, empty or not, so readers never guess
            part = by_shard.get(shard, ann.slice(0, 0))
            write_parquet_atomic(part.sort_by(schema.UID), store.annotations_path(rec, shard))
    dropped: dict[str, int] = {}
    for r in drops.column(schema.DROP_REASON).to_pylist():
        dropped[r] = dropped.get(r, 0) + 1
    stats = {
        "in": table.num_rows,
        "out": table.num_rows - drops.num_rows,
        "dropped": dropped,
        "seconds": round(time.perf_counter() - t0, 4),
        "summary": result.summary,
    }
    store.mark_stage_done(rec, stats)
    record_stage_shard(rec.name, stats)
    return stats


# ---------------------------------------------------------------------------------------------
# Emit: the dataset shards and the "kept" ledger rows
# ---------------------------------------------------------------------------------------------
PROVENANCE = {
    "method": pa.string(),
    "seed_dataset": pa.string(),
    "seed_ids": pa.list_(pa.string()),
    "similarity": pa.float32(),
    "cluster_id": pa.int64(),
}


def dataset_columns(view: ShardView, shard: int) -> list[str]:
    """Every column worth shipping: base + provenance + scalar stage outputs. Descriptors and
    embeddings (fixed-size lists) stay in their stage directories and are never read here."""
    return [
        c for c, typ in view.column_types(shard).items()
        if c not in (schema.DROP_REASON, schema.DROP_DETAILS) and not pa.types.is_fixed_size_list(typ)
    ]


def emit_shard(run_dir: str, spec: dict, shard: int, as_is: list[str], has_retrieval: bool) -> dict:
    t0 = time.perf_counter()
    spec_ = StageSpec(**spec)
    store, rec, view = RunStore(run_dir), spec_.rec(), spec_.view(RunStore(run_dir))
    table = view.read(shard, dataset_columns(view, shard))
    role = table.column(schema.ROLE)
    is_pool = pc.equal(role, schema.POOL)
    is_seed = pc.equal(role, schema.SEED)
    seed_as_is = pc.and_(is_seed, pc.is_in(table.column(schema.SEED_DATASET), value_set=pa.array(as_is, pa.string())))
    kept_mask = pc.fill_null(pc.or_(is_pool, seed_as_is), False)
    reasons = pc.if_else(pc.equal(role, schema.EXCLUDE), pa.scalar("evaluation_set"), pa.scalar("used_as_query"))
    details = pa.array([json.dumps({"role": r}) for r in role.to_pylist()], pa.string())
    ledger_drop = _drop_ledger(table, pc.invert(kept_mask), rec.name, reasons, details)
    kept = _fill_provenance(table.filter(kept_mask), has_retrieval)
    ledger = pa.concat_tables([ledger_drop, ledger_rows(kept, rec.name, KEPT)]).sort_by(schema.UID)
    write_parquet_atomic(ledger, store.ledger_path(rec, shard))
    out_path = store.dataset_dir / f"part-{shard:05d}.parquet"
    if kept.num_rows:
        write_parquet_atomic(kept, out_path, row_group_size=256)
    elif out_path.exists():
        out_path.unlink()
    stats = _stats(table.num_rows, kept.num_rows, ledger_drop, time.perf_counter() - t0)
    store.mark_shard_done(rec, shard, stats)
    record_stage_shard(rec.name, stats)
    return stats


def _fill_provenance(kept: pa.Table, has_retrieval: bool) -> pa.Table:
    """Seeds are taken as they are; pool images carry the retrieve stage's method or, without
    retrieval, 'pool'."""
    for name, typ in PROVENANCE.items():
        if name not in kept.column_names:
            kept = kept.append_column(name, pa.nulls(kept.num_rows, typ))
    pool_method = pc.coalesce(kept.column("method"), pa.scalar("retrieved" if has_retrieval else "pool"))
    method = pc.if_else(pc.equal(kept.column(schema.ROLE), schema.SEED), pa.scalar("as_is"), pool_method)
    return kept.set_column(kept.column_names.index("method"), "method", method)


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, req: RunRequest):
        self.req = req
        self.cfg = req.config
        self.store = RunStore(req.out)
        self.seeds: list[ResolvedSet] = resolve_seeds(req.seeds, self.cfg)
        self.excludes: list[ResolvedSet] = resolve_excludes(req.excludes, self.cfg)
        for p in req.pools:
            if not Path(p).exists():
                raise RunError(f"pool path {p} does not exist")
        self.stage_stats: list[dict] = []
        self.warnings: list[str] = []

    # -- identity -----------------------------------------------------------------------------
    def inputs(self) -> dict:
        return {
            "pools": [str(Path(p).resolve()) for p in self.req.pools],
            "seeds": [s.to_dict() for s in self.seeds],
            "excludes": [e.to_dict() for e in self.excludes],
            "allow_missing_weights": self.req.allow_missing_weights,
        }

    def fingerprint(self) -> str:
        payload = json.dumps({"config": self.cfg.fingerprint(), "inputs": self.inputs()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _check_resume(self) -> None:
        fp = self.fingerprint()
        if self.store.run_json.exists():
            old = read_json(self.store.run_json)
            if old.get("fingerprint") != fp:
                raise RunError(
                    f"{self.store.run_dir} holds a run with a different configuration or inputs "
                    f"(fingerprint {old.get('fingerprint')} != {fp}); resuming would mix outputs. "
                    "Re-run with the original --config/--seeds/--pool/--exclude, or use a new --out directory."
                )
            log.info("resuming run in %s", self.store.run_dir)
        elif self.req.resume:
            raise RunError(f"--resume given but {self.store.run_dir} holds no run (no run.json)")
        else:
            write_json_atomic(
                {
                    "fingerprint": fp,
                    "config": self.cfg.model_dump(mode="json"),
                    "inputs": self.inputs(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                self.store.run_json,
            )

    def context(self, stage_dir: Path) -> StageContext:
        import ray

        res = ray.cluster_resources() if ray.is_initialized() else {}
        return StageContext(
            run_dir=self.store.run_dir,
            stage_dir=stage_dir,
            seed=self.cfg.seed,
            seeds={s.name: {"path": s.path, "recipes": list(s.recipes)} for s in self.seeds},
            excludes={e.name: {"path": e.path} for e in self.excludes},
            allow_missing_weights=self.req.allow_missing_weights,
            cluster_cpus=int(res.get("CPU", 1)),
            cluster_gpus=int(res.get("GPU", 0)),
        )

    # -- main ---------------------------------------------------------------------------------
    def run(self) -> dict:
        t_start = time.perf_counter()
        self.store.run_dir.mkdir(parents=True, exist_ok=True)
        # Stages are built and checked before anything is written or Ray is started.
        self._build_stages(preflight=True)
        self._check_resume()
        self._status("running")
        init_ray(self.cfg, self.req.address, progress=self.req.progress)
        stages = self._build_stages(preflight=False)  # now with cluster resources known
        history: list[StageRecord] = []
        ingest_rec = StageRecord(0, "ingest", "ingest", INGEST, [n for n in schema.INGEST_SCHEMA.names if n != schema.UID])
        self._ingest(ingest_rec)
        history.append(ingest_rec)
        for i, stage in enumerate(stages, start=1):
            shape = GLOBAL if isinstance(stage, GlobalStage) else MAP
            rec = StageRecord(i, stage.name, stage.config.kind, shape, stage.output_schema().names)
            spec = StageSpec(
                stage.config.kind,
                stage.config.model_dump(mode="json"),
                self.context(self.store.stage_dir(rec)).to_dict(),
                rec.to_dict(),
                [h.to_dict() for h in history],
            )
            if shape == MAP:
                self._run_map(stage, spec, history)
            else:
                self._run_global(stage, spec, history)
            history.append(rec)
            self._status("running", history)
        emit_rec = StageRecord(len(stages) + 1, "emit", "emit", MAP, [])
        self._emit(emit_rec, history, stages)
        history.append(emit_rec)
        manifest = self._manifest(stages, history, time.perf_counter() - t_start)
        self._status("finished", history)
        return manifest

    def _build_stages(self, preflight: bool) -> list[Stage]:
        stages: list[Stage] = []
        for i, sc in enumerate(self.cfg.enabled_stages(), start=1):
            cls = stage_class(sc.kind)
            stage = cls(sc, self.context(self.store.run_dir / "stages" / f"{i:02d}_{sc.stage_name}"))
            if preflight:
                self.warnings += list(stage.preflight())
            stages.append(stage)
        return stages

    def _pending(self, rec: StageRecord, shards: list[int]) -> list[int]:
        return [s for s in shards if not self.store.shard_done(rec, s)]

    def _collect(self, rec: StageRecord, shards: list[int], seconds: float) -> dict:
        agg: dict[str, Any] = {"stage": rec.name, "kind": rec.kind, "in": 0, "out": 0, "dropped": {}, "seconds": 0.0, "wall_seconds": round(seconds, 3)}
        for s in shards:
            st = self.store.shard_stats(rec, s)
            agg["in"] += st["in"]
            agg["out"] += st["out"]
            agg["seconds"] += st["seconds"]
            for r, c in st["dropped"].items():
                agg["dropped"][r] = agg["dropped"].get(r, 0) + c
        return agg

    def _run_shards(self, rec: StageRecord, shards: list[int], row_for, fn, options) -> None:
        """Run ``fn`` over the shards of ``rec`` that have no completion marker, one shard per
        Ray Data batch, then record the stage's statistics (also when it was already done).
        ``row_for(shard)`` is the dataset row handed to ``fn``; ``options(n_pending)`` gives
        the ``map_batches`` arguments (task or actor-pool resources)."""
        import ray

        if self.store.stage_done(rec):
            self.stage_stats.append(read_json(self.store.stage_marker(rec))["stats"])
            return
        t0 = time.perf_counter()
        pending = self._pending(rec, shards)
        if pending:
            wait_for_free_cpus()
            ds = ray.data.from_items([row_for(s) for s in pending], override_num_blocks=len(pending))
            ds.map_batches(fn, batch_size=1, **options(len(pending))).materialize()
        stats = self._collect(rec, shards, time.perf_counter() - t0)
        self.store.mark_stage_done(rec, {"stats": stats, "shards": shards})
        self.stage_stats.append(stats)

    def _ingest(self, rec: StageRecord) -> None:
        from curation.ingest.plan import SourceSpec, WorkUnit, plan_units

        if self.store.plan_json.exists():
            units = [WorkUnit.from_dict(u) for u in read_json(self.store.plan_json)["units"]]
        else:
            specs = [SourceSpec(str(Path(p).resolve()), schema.POOL, "pool") for p in self.req.pools]
            specs += [SourceSpec(s.path, schema.SEED, f"seed:{s.name}", s.name) for s in self.seeds]
            specs += [SourceSpec(e.path, schema.EXCLUDE, f"exclude:{e.name}", e.name) for e in self.excludes]
            units = plan_units(specs, self.cfg.ingest)
            write_json_atomic({"units": [u.to_dict() for u in units]}, self.store.plan_json)
        by_shard = {u.shard: u for u in units}
        ingest_cfg = self.cfg.ingest.model_dump(mode="json")
        run_dir, record = str(self.store.run_dir), rec.to_dict()

        def fn(batch: dict) -> dict:
            stats = [ingest_shard(run_dir, record, json.loads(u), ingest_cfg) for u in batch["unit"]]
            return {"stats": np.asarray([json.dumps(s) for s in stats])}

        self._run_shards(
            rec, list(by_shard), lambda s: {"unit": json.dumps(by_shard[s].to_dict())}, fn, lambda n: {"num_cpus": 0.5}
        )

    def _run_map(self, stage: MapStage, spec: StageSpec, history: list[StageRecord]) -> None:
        import ray

        res = stage.resources()

        def options(n_pending: int) -> dict:
            ctx = self.context(self.store.run_dir)
            if res.num_gpus > 0:
                cap = max(1, int(ctx.cluster_gpus // res.num_gpus))
            else:
                cap = max(1, int(ctx.cluster_cpus // max(res.num_cpus, 0.01)))
            lo, hi = res.concurrency
            hi = max(1, min(hi, cap, n_pending))
            lo = max(1, min(lo, hi))
            return {
                "fn_constructor_kwargs": {"spec": spec.__dict__, "run_dir": str(self.store.run_dir)},
                "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                "num_cpus": res.num_cpus,
                "num_gpus": res.num_gpus or None,
                **({"memory": res.memory_bytes} if res.memory_bytes else {}),
            }

        shards = ShardView(self.store, history).shards()
        self._run_shards(spec.rec(), shards, lambda s: {"shard": s}, MapShardWorker, options)

    def _run_global(self, stage: GlobalStage, spec: StageSpec, history: list[StageRecord]) -> None:
        import ray

        rec = spec.rec()
        if not self.store.stage_done(rec):
            shards = ShardView(self.store, history).shards()
            res = stage.resources()
            task = ray.remote(run_global).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus or 0, max_retries=0)
            ray.get(task.remote(spec.__dict__, str(self.store.run_dir), shards))
        stats = read_json(self.store.stage_marker(rec))
        self.stage_stats.append({"stage": rec.name, "kind": rec.kind, "wall_seconds": stats["seconds"], **stats})

    def _emit(self, rec: StageRecord, history: list[StageRecord], stages: list[Stage]) -> None:
        as_is = [s.name for s in self.seeds if any(r["method"] == "as_is" for r in s.recipes)]
        has_retrieval = any(s.config.kind == "retrieve" for s in stages)
        spec = StageSpec("emit", {}, {}, rec.to_dict(), [h.to_dict() for h in history]).__dict__
        run_dir = str(self.store.run_dir)

        def fn(batch: dict) -> dict:
            stats = [emit_shard(run_dir, spec, int(s), as_is, has_retrieval) for s in batch["shard"]]
            return {"stats": np.asarray([json.dumps(s) for s in stats])}

        shards = ShardView(self.store, history).shards()
        self._run_shards(rec, shards, lambda s: {"shard": s}, fn, lambda n: {"num_cpus": 0.5})

    # -- outputs ------------------------------------------------------------------------------
    def _status(self, state: str, history: list[StageRecord] | None = None) -> None:
        write_json_atomic(
            {
                "state": state,
                "run_dir": str(self.store.run_dir),
                "stages_done": [h.name for h in (history or [])],
                "stages": [s.get("stage") for s in self.stage_stats],
                "stats": self.stage_stats,
                "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            self.store.status_json,
        )

    def _manifest(self, stages: list[Stage], history: list[StageRecord], seconds: float) -> dict:
        from curation.manifest import build_manifest

        manifest = build_manifest(self, stages, history, seconds)
        write_json_atomic(manifest, self.store.manifest_json)
        return manifest


def wait_for_free_cpus(timeout: float = 10.0) -> None:
    """The previous stage's actor pool releases its CPUs asynchronously; starting the next
    dataset before that makes Ray Data warn that the cluster has no CPU (and wait anyway)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 0.5:
        time.sleep(0.1)


def init_ray(cfg: PipelineConfig, address: str | None, progress: bool = True) -> None:
    """Join ``address`` (or an ambient cluster when running as a Ray job) or start a local Ray
    that binds its dashboard to loopback."""
    import ray

    if not ray.is_initialized():
        _init(cfg, address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray._private", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _init(cfg: PipelineConfig, address: str | None) -> None:
    import os

    import ray

    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": cfg.ray.include_dashboard,
        "dashboard_host": cfg.ray.dashboard_host,
        "configure_logging": False,
        "log_to_driver": False,
    }
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory
    ray.init(**kwargs)


def run_pipeline(req: RunRequest) -> dict:
    """Library entry point behind ``curate run``."""
    return Runner(req).run()
