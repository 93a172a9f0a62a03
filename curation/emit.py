"""Output shards: the kept rows of every ingest shard, rebalanced to a target size, written as
Parquet (the Hugging Face ``Image`` layout, ``curation.contract``) and/or WebDataset tars.

The emit stage runs in two passes. ``shard_ops.emit_shard`` writes each ingest shard's ledger
rows and records, in its marker, how many rows it keeps (and their image bytes when shards are
sized in bytes). Once every shard is marked, the driver cuts the kept rows, in (shard, uid)
order, into output shards of ``emit.shard_rows`` rows or ``emit.shard_bytes`` bytes
(``plan_layout``); the cut is a pure function of the markers, stored as ``_layout.json``, so a
resumed run makes the same shards. Each output shard is one task (``write_output_shard``) that
reads its slices from the run's stages, writes its files atomically and then its marker: a run
killed while writing resumes at output-shard granularity, and the stage is marked done only
when every output shard is.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from curation import contract, schema
from curation.ingest.rows import extra_fields
from curation.shard_ops import StageSpec, kept_mask
from curation.store import RunStore, ShardView, StageRecord, read_json, write_json_atomic

PARQUET, WEBDATASET = "parquet", "webdataset"
WEBDATASET_DIR = "webdataset"


# ---------------------------------------------------------------------------------------------
# Layout (driver)
# ---------------------------------------------------------------------------------------------
def plan_layout(counts: list[tuple[int, int, list[int] | None]], shard_rows: int | None, shard_bytes: int | None) -> list[list[list[int]]]:
    """Output shards as lists of ``[ingest shard, start, stop)`` slices of kept rows.

    ``counts`` is ``(shard, kept rows, per-row bytes or None)`` in shard order. A shard closes when
    it holds ``shard_rows`` rows or adding the next row would pass ``shard_bytes`` (a row larger
    than the target gets a shard of its own). Both None: one output shard per non-empty ingest
    shard."""
    if not shard_rows and not shard_bytes:
        return [[[s, 0, n]] for s, n, _ in counts if n]
    out: list[list[list[int]]] = []
    cur: list[list[int]] = []
    rows = size = 0
    for shard, n, sizes in counts:
        start = 0
        if not shard_bytes:  # rows only: whole runs of rows at once
            while start < n:
                take = min(n - start, shard_rows - rows)
                cur.append([shard, start, start + take])
                rows, start = rows + take, start + take
                if rows >= shard_rows:
                    out.append(cur)
                    cur, rows = [], 0
            continue
        for i in range(n):
            b = int(sizes[i]) if sizes else 0
            if (shard_rows and rows >= shard_rows) or (rows and size + b > shard_bytes):
                if i > start:
                    cur.append([shard, start, i])
                out.append(cur)
                cur, rows, size, start = [], 0, 0, i
            rows, size = rows + 1, size + b
        if n > start:
            cur.append([shard, start, n])
    if cur:
        out.append(cur)
    return out


def layout_path(store: RunStore, rec: StageRecord) -> Path:
    return store.stage_dir(rec) / "_layout.json"


def output_marker(store: RunStore, rec: StageRecord, index: int) -> Path:
    return store.stage_dir(rec) / "output" / f"part-{index:05d}.done"


def load_or_make_layout(store: RunStore, rec: StageRecord, shards: list[int], opts: dict) -> dict:
    """The output layout, made once from the shard markers (all present) and stored: the
    slices of every output shard, the formats, and the columns (optional ones that some kept
    row has a value for, the pass-through columns)."""
    path = layout_path(store, rec)
    if path.exists():
        return read_json(path)
    emit_cfg = opts["emit"]
    markers = [store.shard_stats(rec, s) for s in shards]
    counts = [(s, int(m["out"]), m.get("row_bytes")) for s, m in zip(shards, markers)]
    layout = {
        "shards": plan_layout(counts, emit_cfg.get("shard_rows"), emit_cfg.get("shard_bytes")),
        "optional_columns": sorted({c for m in markers for c in m.get("has", [])}),
        "extra_types": dict(opts["extra_types"]),
        "formats": list(emit_cfg["formats"]),
    }
    write_json_atomic(layout, path)
    return layout


def read_outputs(store: RunStore) -> tuple[dict, list[dict]] | None:
    """(layout, output-shard markers) of a run whose emit stage has written its shards."""
    dirs = sorted((store.run_dir / "stages").glob("*_emit"))
    if not dirs or not (dirs[-1] / "_layout.json").exists():
        return None
    layout = read_json(dirs[-1] / "_layout.json")
    markers = [read_json(dirs[-1] / "output" / f"part-{k:05d}.done") for k in range(len(layout["shards"]))]
    return layout, markers


def described_columns(layout: dict) -> list[dict]:
    return contract.describe(layout["optional_columns"], extra_fields(layout["extra_types"]))


def remove_stale_outputs(store: RunStore, n_shards: int) -> None:
    """Files of a dataset directory that the layout does not name (an earlier, different run)."""
    for folder, suffix in ((store.dataset_dir, ".parquet"), (store.run_dir / WEBDATASET_DIR, ".tar")):
        for p in folder.glob(f"part-*{suffix}") if folder.is_dir() else []:
            stem = p.name[len("part-") : -len(suffix)]
            if not stem.isdigit() or int(stem) >= n_shards:
                p.unlink()


# ---------------------------------------------------------------------------------------------
# Writing one output shard (worker)
# ---------------------------------------------------------------------------------------------
def kept_rows(view: ShardView, shard: int, opts: dict, out_schema: pa.Schema) -> pa.Table:
    """The contract table of ``shard``'s kept rows, in uid order."""
    available = set(view.available_columns())
    extras = [name for name in opts["extra_types"] if name in out_schema.names]
    want = [c for c in [*contract.READ_COLUMNS, *contract.PROVENANCE, *extras] if c in available]
    table = view.read(shard, want)
    table = fill_provenance(table.filter(kept_mask(table, opts["as_is"])), opts["has_retrieval"])
    original = view.read_as_written(shard, [schema.WIDTH, schema.HEIGHT], table.column(schema.UID), upto=1)
    return contract.build(table, original, out_schema)


def fill_provenance(kept: pa.Table, has_retrieval: bool) -> pa.Table:
    """Seeds are taken as they are; pool images carry the retrieve stage's method or, without
    retrieval, 'pool'."""
    types = {c.name: c.type for c in contract.COLUMNS}
    for name in contract.PROVENANCE:
        if name not in kept.column_names:
            kept = kept.append_column(name, pa.nulls(kept.num_rows, types[name]))
    pool_method = pc.coalesce(kept.column("method"), pa.scalar("retrieved" if has_retrieval else "pool"))
    method = pc.if_else(pc.equal(kept.column(schema.ROLE), schema.SEED), pa.scalar("as_is"), pool_method)
    return kept.set_column(kept.column_names.index("method"), "method", method)


def dataset_schema(layout: dict) -> pa.Schema:
    return contract.output_schema(layout["optional_columns"], extra_fields(layout["extra_types"]))


def write_output_shard(item: dict) -> dict:
    """Task: output shard ``item["index"]`` from its slices; files first, then the marker."""
    t0 = time.perf_counter()
    store = RunStore(item["run_dir"])
    spec = StageSpec(**item["spec"])
    rec, view, opts = spec.rec(), spec.view(store), spec.config
    marker = output_marker(store, rec, item["index"])
    if marker.exists():
        return read_json(marker)
    layout = read_json(layout_path(store, rec))
    out_schema = dataset_schema(layout)
    name = f"part-{item['index']:05d}"
    writers = []
    if PARQUET in layout["formats"]:
        writers.append(ParquetOut(store.dataset_dir / f"{name}.parquet", out_schema, opts["emit"]["row_group_rows"]))
    if WEBDATASET in layout["formats"]:
        writers.append(TarOut(store.run_dir / WEBDATASET_DIR / f"{name}.tar"))
    rows = 0
    for shard, start, stop in layout["shards"][item["index"]]:
        part = kept_rows(view, shard, opts, out_schema).slice(start, stop - start)
        rows += part.num_rows
        for w in writers:
            w.write(part)
    files = {w.kind: w.close(store.run_dir) for w in writers}
    stats = {"rows": rows, "files": files, "seconds": round(time.perf_counter() - t0, 4)}
    write_json_atomic(stats, marker)
    return stats


def _tmp(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def _finish(tmp: Path, path: Path, run_dir: Path) -> dict:
    from curation.manifest import sha256_file

    os.replace(tmp, path)
    return {"path": str(path.relative_to(run_dir)), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


class ParquetOut:
    kind = PARQUET

    def __init__(self, path: Path, out_schema: pa.Schema, row_group_rows: int):
        self.path, self.tmp, self.row_group_rows = path, _tmp(path), row_group_rows
        self.writer = pq.ParquetWriter(self.tmp, out_schema, compression="zstd")

    def write(self, table: pa.Table) -> None:
        if table.num_rows:
            self.writer.write_table(table, row_group_size=self.row_group_rows)

    def close(self, run_dir: Path) -> dict:
        self.writer.close()
        return _finish(self.tmp, self.path, run_dir)


class TarOut:
    """WebDataset samples: ``<key>.<ext>`` (the image), ``<key>.json`` (every other column) and
    ``<key>.txt`` (the caption, as img2dataset writes it). Members carry fixed owner, mode and
    time, so the same rows give the same bytes."""

    kind = WEBDATASET

    def __init__(self, path: Path):
        self.path, self.tmp = path, _tmp(path)
        self.tar = tarfile.open(self.tmp, "w", format=tarfile.USTAR_FORMAT)

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o644, 0
        self.tar.addfile(info, io.BytesIO(data))

    def write(self, table: pa.Table) -> None:
        for row in table.to_pylist():
            key, image = row[contract.KEY], row[contract.IMAGE]
            self._add(f"{key}.{contract.extension(row.get(schema.FORMAT))}", image["bytes"] or b"")
            self._add(f"{key}.json", json.dumps(contract.sample_metadata(row), sort_keys=True, default=str).encode())
            if row.get(contract.CAPTION):
                self._add(f"{key}.txt", row[contract.CAPTION].encode())

    def close(self, run_dir: Path) -> dict:
        self.tar.close()
        return _finish(self.tmp, self.path, run_dir)
