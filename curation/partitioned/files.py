"""Partition files: the shuffle of a partitioned global stage, on the run directory.

A task of step S writes, for each dataset D it produces, one Parquet file
``steps/S/D/task-TTTTT.parquet`` whose rows are sorted by partition, each partition in row groups
of at most ``CHUNK_ROWS`` rows; its marker ``steps/S/task-TTTTT.json`` (written last, atomically)
lists ``[partition, row_group, rows]`` for every file. When every task of S is done, the driver
merges the markers into one sorted index per dataset (``_index.npy``, memory-mapped by readers), so
the reducer of partition p reads exactly its row groups, chunk by chunk, from every file.

Nothing here holds more than one chunk: memory per task is bounded by the chunk size and by what
the task itself keeps, never by the number of rows in a dataset.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from curation.store import write_json_atomic

PARTITION = "_partition"
CHUNK_ROWS = 65_536
INDEX_DTYPE = np.dtype([("partition", "<i8"), ("file", "<i4"), ("row_group", "<i4"), ("rows", "<i8")])


def task_name(task: int) -> str:
    return f"task-{task:05d}"


def marker_path(step_dir: Path, task: int) -> Path:
    return step_dir / f"{task_name(task)}.json"


def write_partitioned(path: Path, table: pa.Table) -> list[list[int]]:
    """Write ``table`` (with a ``_partition`` column) sorted by partition; return the
    ``[partition, row_group, rows]`` entries of the file. An empty table writes nothing."""
    if table.num_rows == 0:
        return []
    part = table.column(PARTITION).to_numpy().astype(np.int64)
    order = np.argsort(part, kind="stable")
    table = table.drop_columns([PARTITION]).take(pa.array(order))
    part = part[order]
    bounds = np.flatnonzero(np.r_[True, part[1:] != part[:-1], True])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    entries: list[list[int]] = []
    with pq.ParquetWriter(tmp, table.schema, compression="zstd") as writer:
        rg = 0
        for a, b in zip(bounds[:-1], bounds[1:]):
            for start in range(a, b, CHUNK_ROWS):
                stop = min(b, start + CHUNK_ROWS)
                writer.write_table(table.slice(start, stop - start), row_group_size=CHUNK_ROWS)
                entries.append([int(part[a]), rg, int(stop - start)])
                rg += 1
    os.replace(tmp, path)
    return entries


def write_task_outputs(step_dir: Path, task: int, outputs: dict[str, pa.Table], stats: dict) -> dict:
    """Write every dataset a task produced, then its marker (the task's completion record)."""
    written = {}
    for dataset, table in outputs.items():
        path = step_dir / dataset / f"{task_name(task)}.parquet"
        entries = write_partitioned(path, table)
        if entries:
            written[dataset] = {"file": str(path.relative_to(step_dir)), "groups": entries}
    record = {"task": task, "stats": stats, "outputs": written}
    write_json_atomic(record, marker_path(step_dir, task))
    return record


def task_done(step_dir: Path, task: int) -> bool:
    return marker_path(step_dir, task).exists()


def read_marker(step_dir: Path, task: int) -> dict:
    return json.loads(marker_path(step_dir, task).read_text())


def build_indexes(step_dir: Path, tasks: list[int], datasets: list[str]) -> dict[str, int]:
    """Merge the markers of a finished step into one index per dataset; returns rows per dataset."""
    entries: dict[str, list] = {d: [] for d in datasets}
    files: dict[str, list[str]] = {d: [] for d in datasets}
    for t in tasks:
        for dataset, out in read_marker(step_dir, t)["outputs"].items():
            fi = len(files[dataset])
            files[dataset].append(out["file"])
            entries[dataset].extend((p, fi, rg, n) for p, rg, n in out["groups"])
    totals = {}
    for dataset in datasets:
        arr = np.array(entries[dataset], dtype=INDEX_DTYPE) if entries[dataset] else np.zeros(0, INDEX_DTYPE)
        arr = arr[np.argsort(arr["partition"], kind="stable")]
        d = step_dir / dataset
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f"._index.{uuid.uuid4().hex}.npy"
        np.save(tmp, arr)
        os.replace(tmp, d / "_index.npy")
        write_json_atomic({"files": files[dataset], "rows": int(arr["rows"].sum())}, d / "_files.json")
        totals[dataset] = int(arr["rows"].sum())
    return totals


class PartitionedDataset:
    """Read side of one dataset of a finished step."""

    def __init__(self, step_dir: Path, name: str):
        self.dir = step_dir / name
        self.step_dir = step_dir
        meta = json.loads((self.dir / "_files.json").read_text())
        self.files: list[str] = meta["files"]
        self.rows: int = meta["rows"]
        self.index = np.load(self.dir / "_index.npy", mmap_mode="r")

    def _entries(self, partition: int) -> np.ndarray:
        parts = self.index["partition"]
        a, b = np.searchsorted(parts, partition, "left"), np.searchsorted(parts, partition, "right")
        return np.asarray(self.index[a:b])

    def partitions(self) -> np.ndarray:
        """Partitions holding at least one row, ascending."""
        return np.unique(np.asarray(self.index["partition"]))

    def partition_rows(self, partition: int) -> int:
        return int(self._entries(partition)["rows"].sum())

    def chunks(self, partition: int, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The partition's rows, one row group at a time, in a fixed order (file, row group)."""
        for e in self._entries(partition):
            yield pq.ParquetFile(self.step_dir / self.files[int(e["file"])]).read_row_group(int(e["row_group"]), columns=columns)

    def read(self, partition: int, columns: list[str] | None = None, schema: pa.Schema | None = None) -> pa.Table:
        """The whole partition at once (for partitions the caller knows to be bounded)."""
        parts = list(self.chunks(partition, columns))
        if parts:
            return pa.concat_tables(parts)
        if schema is None:
            return pa.table({})
        return schema.empty_table() if columns is None else schema.empty_table().select(columns)


def with_partition(table: pa.Table, partition) -> pa.Table:
    """``table`` plus its ``_partition`` column (an int or an array of ints)."""
    n = table.num_rows
    values = np.full(n, int(partition), np.int64) if np.isscalar(partition) else np.asarray(partition, np.int64)
    return table.append_column(PARTITION, pa.array(values, pa.int64()))
