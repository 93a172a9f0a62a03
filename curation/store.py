"""The run directory: atomic Parquet/JSON writes, completion markers, and reading a shard's
columns across stages.

Each stage writes ``uid`` plus only the columns it produced, so image bytes are stored once
(unless a stage replaces them). ``ShardView`` stitches a shard back together: the row set comes
from the latest per-shard stage, minus the rows that later global stages dropped, and each
column comes from the latest stage that wrote it.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import schema
from curation.stage import STAGE_NAME

INGEST, MAP, GLOBAL = "ingest", "map", "global"


def write_parquet_atomic(table: pa.Table, path: Path, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    pq.write_table(table, tmp, compression="zstd", **kwargs)
    os.replace(tmp, path)


def write_json_atomic(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def part_name(shard: int) -> str:
    return f"part-{shard:05d}"


@dataclass
class StageRecord:
    """Where one executed stage keeps its output, and which columns it wrote."""

    index: int
    name: str
    kind: str
    shape: str  # ingest | map | global
    columns: list[str] = field(default_factory=list)

    @property
    def dirname(self) -> str:
        return f"{self.index:02d}_{self.name}"

    def to_dict(self) -> dict:
        return asdict(self)


class UnsafeRunPath(ValueError):
    """A path the store was asked to build would leave the run directory."""


class RunStore:
    """Every path of a run directory. Paths that carry a stage name are checked to stay inside
    it: the name must be one plain component (``STAGE_NAME``), so ``..`` and ``/`` never reach
    the file system, whatever called the store (a stale plan, a hand-written record)."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir).resolve()

    def _stage_subdir(self, root: Path, rec: StageRecord) -> Path:
        if not STAGE_NAME.fullmatch(rec.name) or rec.index < 0:
            raise UnsafeRunPath(f"stage {rec.name!r} (#{rec.index}) cannot name a directory inside {self.run_dir}")
        return root / rec.dirname

    # -- layout -------------------------------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.run_dir / "run.json"

    @property
    def plan_dir(self) -> Path:
        """The ingest plan: unit files and their index (``curation.plan_files``)."""
        return self.run_dir / "plan"

    @property
    def legacy_plan_json(self) -> Path:
        """Where runs made before plan files kept every unit in one JSON (converted on resume)."""
        return self.run_dir / "plan.json"

    @property
    def manifest_json(self) -> Path:
        return self.run_dir / "manifest.json"

    @property
    def status_json(self) -> Path:
        return self.run_dir / "status.json"

    @property
    def replan_json(self) -> Path:
        """Present while a ``--replan`` discards the outputs of the previous plan."""
        return self.run_dir / "replan.json"

    def plan_outputs(self) -> list[Path]:
        """Everything made under the current plan: what a re-plan discards. The plan goes last,
        so a replan killed half-way still has the old plan (and its marker) to finish from."""
        return [self.run_dir / "stages", self.ledger_root, self.dataset_dir, self.run_dir / "webdataset",
                self.run_dir / "README.md", self.manifest_json, self.run_dir / "report.html",
                self.legacy_plan_json, self.plan_dir]

    @property
    def dataset_dir(self) -> Path:
        return self.run_dir / "dataset"

    @property
    def ledger_root(self) -> Path:
        return self.run_dir / "ledger"

    def stage_dir(self, rec: StageRecord) -> Path:
        return self._stage_subdir(self.run_dir / "stages", rec)

    def ledger_dir(self, rec: StageRecord) -> Path:
        return self._stage_subdir(self.ledger_root, rec)

    # -- markers ------------------------------------------------------------------------------
    def shard_marker(self, rec: StageRecord, shard: int) -> Path:
        return self.stage_dir(rec) / f"{part_name(shard)}.done"

    def shard_done(self, rec: StageRecord, shard: int) -> bool:
        return self.shard_marker(rec, shard).exists()

    def mark_shard_done(self, rec: StageRecord, shard: int, stats: dict) -> None:
        write_json_atomic(stats, self.shard_marker(rec, shard))

    def shard_stats(self, rec: StageRecord, shard: int) -> dict:
        return read_json(self.shard_marker(rec, shard))

    def stage_marker(self, rec: StageRecord) -> Path:
        return self.stage_dir(rec) / "_SUCCESS"

    def stage_done(self, rec: StageRecord) -> bool:
        return self.stage_marker(rec).exists()

    def mark_stage_done(self, rec: StageRecord, stats: dict) -> None:
        write_json_atomic(stats, self.stage_marker(rec))

    # -- per-shard files ----------------------------------------------------------------------
    def part_path(self, rec: StageRecord, shard: int) -> Path:
        return self.stage_dir(rec) / f"{part_name(shard)}.parquet"

    def drops_path(self, rec: StageRecord, shard: int) -> Path:
        return self.stage_dir(rec) / "drops" / f"{part_name(shard)}.parquet"

    def annotations_path(self, rec: StageRecord, shard: int) -> Path:
        return self.stage_dir(rec) / "annotations" / f"{part_name(shard)}.parquet"

    def steps_dir(self, rec: StageRecord) -> Path:
        """Where a partitioned global stage keeps its intermediate datasets and task markers."""
        return self.stage_dir(rec) / "steps"

    def ledger_path(self, rec: StageRecord, shard: int) -> Path:
        return self.ledger_dir(rec) / f"{part_name(shard)}.parquet"


def split_by_shard(table: pa.Table) -> dict[int, pa.Table]:
    """Group a uid-keyed table by the shard its uids belong to."""
    if table.num_rows == 0:
        return {}
    shards = np.asarray(table.column(schema.UID).to_numpy()) >> schema.UID_SHARD_BITS
    out = {}
    for s in np.unique(shards):
        out[int(s)] = table.filter(pa.array(shards == s))
    return out


class ShardView:
    """Read a shard as it stands after the stages in ``history``."""

    def __init__(self, store: RunStore, history: Iterable[StageRecord]):
        self.store = store
        self.history = list(history)

    def available_columns(self) -> list[str]:
        cols: list[str] = []
        for rec in self.history:
            for c in rec.columns:
                if c not in cols:
                    cols.append(c)
        return cols

    def _base(self) -> int:
        for i in range(len(self.history) - 1, -1, -1):
            if self.history[i].shape in (INGEST, MAP):
                return i
        raise RuntimeError("no ingest stage in history")

    def read(self, shard: int, columns: Iterable[str]) -> pa.Table:
        columns = [c for c in dict.fromkeys(columns) if c != schema.UID]
        base_i = self._base()
        base = self.history[base_i]
        path = self.store.part_path(base, shard)
        uids = pq.read_table(path, columns=[schema.UID]).column(schema.UID) if path.exists() else pa.array([], pa.int64())
        uids = pa.chunked_array([uids]) if isinstance(uids, pa.Array) else uids
        # Rows dropped by global stages after the base stage.
        for rec in self.history[base_i + 1 :]:
            if rec.shape == GLOBAL:
                dp = self.store.drops_path(rec, shard)
                if dp.exists() and len(uids):
                    dropped = pq.read_table(dp, columns=[schema.UID]).column(schema.UID)
                    uids = uids.filter(pc.invert(pc.is_in(uids, value_set=dropped.combine_chunks())))
        uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
        return pa.table({schema.UID: uids, **self._columns(shard, columns, uids, len(self.history))})

    def read_as_written(self, shard: int, columns: list[str], uids: pa.Array, upto: int) -> pa.Table:
        """``columns`` for ``uids`` as the first ``upto`` stages of the history left them
        (``upto=1``: as ingested, before any stage replaced them)."""
        uids = uids.combine_chunks() if isinstance(uids, pa.ChunkedArray) else uids
        return pa.table({schema.UID: uids, **self._columns(shard, list(columns), uids, upto)})

    def column_types(self, shard: int) -> dict[str, pa.DataType]:
        """Type of every available column, from the Parquet footers of the files that provide
        it for ``shard`` (no data is read)."""
        types: dict[str, pa.DataType] = {}
        for col in self.available_columns():
            rec = self.history[self._writer(col, len(self.history))]
            path = self.store.annotations_path(rec, shard) if rec.shape == GLOBAL else self.store.part_path(rec, shard)
            types[col] = pq.read_schema(path).field(col).type
        return types

    def _writer(self, col: str, upto: int) -> int | None:
        for pos in range(upto - 1, -1, -1):
            if col in self.history[pos].columns:
                return pos
        return None

    def _columns(self, shard: int, columns: list[str], uids: pa.Array, upto: int) -> dict[str, pa.Array]:
        """Values of ``columns`` for ``uids`` from the latest stage (before ``upto``) that wrote
        each. Every stage file is read once for all the columns it provides. Where that stage
        left a value null (global annotations cover some rows only; a map stage that replaces a
        column returns null for rows it leaves unchanged), the earlier writer's value shows."""
        by_writer: dict[int, list[str]] = {}
        for col in columns:
            pos = self._writer(col, upto)
            if pos is None:
                raise KeyError(f"no stage wrote column {col!r}; available: {self.available_columns()}")
            by_writer.setdefault(pos, []).append(col)
        out: dict[str, pa.Array] = {}
        for pos, cols in by_writer.items():
            rec = self.history[pos]
            path = self.store.annotations_path(rec, shard) if rec.shape == GLOBAL else self.store.part_path(rec, shard)
            if not path.exists():
                raise FileNotFoundError(f"missing {path} (stage {rec.name}, shard {shard})")
            t = pq.read_table(path, columns=[schema.UID, *cols])
            idx = pc.index_in(uids, value_set=t.column(schema.UID).combine_chunks())
            needs_fallback = []
            for col in cols:
                values = t.column(col).combine_chunks().take(idx)
                out[col] = values
                if values.null_count and self._writer(col, pos) is not None:
                    needs_fallback.append(col)
            if needs_fallback:
                prev = self._columns(shard, needs_fallback, uids, pos)
                for col in needs_fallback:
                    out[col] = pc.if_else(pc.is_null(out[col]), prev[col], out[col])
        return {c: out[c] for c in columns}

    def row_count(self, shard: int) -> int:
        """Rows alive in ``shard``, from Parquet footers only (no data read): the base stage's
        rows minus those later global stages dropped (each drops only live, distinct rows)."""
        base_i = self._base()
        path = self.store.part_path(self.history[base_i], shard)
        n = pq.ParquetFile(path).metadata.num_rows if path.exists() else 0
        for rec in self.history[base_i + 1 :]:
            dp = self.store.drops_path(rec, shard)
            if rec.shape == GLOBAL and dp.exists():
                n -= pq.ParquetFile(dp).metadata.num_rows
        return n

    def shards(self) -> list[int]:
        """Shards that exist at the base stage."""
        base = self.history[self._base()]
        d = self.store.stage_dir(base)
        return sorted(int(p.stem.split("-")[1]) for p in d.glob("part-*.parquet"))
