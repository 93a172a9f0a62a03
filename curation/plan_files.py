"""The ingest plan on disk: work units in Parquet files, written while the plan is made.

A plan of 10^8 inputs must not be one list in the driver's memory nor one JSON file, so the
planner's units (``curation.ingest.plan.iter_units``) go straight into ``RUN/plan/``:

* ``part-000000.parquet``, ...: one row per unit (``shard``, ``spec`` and ``items`` as JSON,
  ``kind``, ``location``, ``n_items``); a file is closed once it holds ``FILE_ITEMS`` items or
  ``FILE_UNITS`` units, so the writer buffers a bounded amount whatever the input size. Row groups
  of ``ROW_GROUP_UNITS`` units let an ingest worker read only the row group of its own unit.
* ``_index.json``, written last: the unit and item counts, each file's first shard and counts,
  and the input fingerprint. A plan directory without it was killed while being written; the
  planner then makes the plan again from scratch (the unit of resume is the shard, not the file).

Readers never load every unit at once: ``Plan.units`` goes file by file, ``Plan.sizes`` and
``Plan.facts`` read the small columns only, and ``read_plan_unit`` reads one unit for a worker.
"""

from __future__ import annotations

import bisect
import json
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.ingest.plan import SourceSpec, WorkUnit
from curation.store import read_json, write_json_atomic, write_parquet_atomic

FORMAT = "curation.plan/1"
INDEX = "_index.json"
FILE_ITEMS = 1 << 16
FILE_UNITS = 1024
ROW_GROUP_UNITS = 16
SCHEMA = pa.schema([("shard", pa.int64()), ("spec", pa.string()), ("kind", pa.string()), ("location", pa.string()),
                    ("n_items", pa.int64()), ("items", pa.string())])


def file_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


class PlanWriter:
    """Writes units as they come; ``finish`` writes the index and returns the ``Plan``. Starting
    a writer removes whatever an earlier, unfinished plan left in ``plan_dir``."""

    def __init__(self, plan_dir: Path, file_items: int = FILE_ITEMS, file_units: int = FILE_UNITS):
        self.dir = Path(plan_dir)
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        self.file_items, self.file_units = file_items, file_units
        self.files: list[dict] = []
        self.rows: dict[str, list] = {name: [] for name in SCHEMA.names}
        self.units = self.items = self.buffered_items = 0
        self._specs: dict[SourceSpec, str] = {}  # each spec's JSON, made once

    def add(self, unit: WorkUnit) -> None:
        if unit.shard != self.units:
            raise ValueError(f"plan units must come in shard order: got {unit.shard}, expected {self.units}")
        spec = self._specs.get(unit.spec) or self._specs.setdefault(unit.spec, json.dumps(asdict(unit.spec), sort_keys=True))
        for name, value in (("shard", unit.shard), ("spec", spec), ("kind", unit.kind), ("location", unit.location),
                            ("n_items", len(unit.items)), ("items", json.dumps(list(unit.items)))):
            self.rows[name].append(value)
        self.units += 1
        self.items += len(unit.items)
        self.buffered_items += len(unit.items)
        if self.buffered_items >= self.file_items or len(self.rows["shard"]) >= self.file_units:
            self._flush()

    def _flush(self) -> None:
        n = len(self.rows["shard"])
        if not n:
            return
        name = file_name(len(self.files))
        table = pa.table(self.rows, schema=SCHEMA)
        write_parquet_atomic(table, self.dir / name, row_group_size=ROW_GROUP_UNITS)
        self.files.append({"name": name, "first_shard": self.rows["shard"][0], "units": n, "items": self.buffered_items})
        self.rows = {name: [] for name in SCHEMA.names}
        self.buffered_items = 0

    def finish(self, inputs: dict | None) -> "Plan":
        self._flush()
        index = {"format": FORMAT, "units": self.units, "items": self.items, "files": self.files, "inputs": inputs}
        write_json_atomic(index, self.dir / INDEX)
        return Plan(self.dir, index)


def write_plan(plan_dir: Path, units: Iterable[WorkUnit], inputs: dict | None, **bounds) -> "Plan":
    """Stream ``units`` into plan files; the index goes last, so an exception (an input that
    cannot be planned, a killed driver) leaves a plan that ``Plan.open`` does not accept."""
    writer = PlanWriter(plan_dir, **bounds)
    for unit in units:
        writer.add(unit)
    return writer.finish(inputs)


class Plan:
    """A finished plan on disk (``Plan.open``), read a file at a time."""

    def __init__(self, plan_dir: Path, index: dict):
        self.dir = Path(plan_dir)
        self.index = index
        self._firsts = [f["first_shard"] for f in index["files"]]
        self._paths = [self.dir / f["name"] for f in index["files"]]

    @classmethod
    def open(cls, plan_dir: Path) -> "Plan | None":
        """The plan in ``plan_dir``, or None when there is none or it was never finished."""
        path = Path(plan_dir) / INDEX
        if not path.exists():
            return None
        index = read_json(path)
        if index.get("format") != FORMAT:
            raise ValueError(f"{path}: not a plan index of format {FORMAT}: {index.get('format')!r}")
        return cls(plan_dir, index)

    @property
    def num_units(self) -> int:
        return int(self.index["units"])

    @property
    def num_items(self) -> int:
        return int(self.index["items"])

    @property
    def inputs(self) -> dict | None:
        """The input fingerprint (``InputFingerprint.to_dict``) the plan was made from."""
        return self.index.get("inputs")

    def paths(self) -> list[Path]:
        return list(self._paths)

    def shards(self) -> list[int]:
        return list(range(self.num_units))

    def file_of(self, shard: int) -> Path:
        """The plan file holding ``shard``."""
        if not 0 <= shard < self.num_units:
            raise KeyError(f"shard {shard} is not in the plan ({self.num_units} units)")
        return self._paths[bisect.bisect_right(self._firsts, shard) - 1]

    def units(self) -> Iterator[WorkUnit]:
        for path in self.paths():
            yield from _units(pq.read_table(path))

    def sizes(self) -> dict[int, int]:
        """shard -> number of items (one int pair per unit; no item is read)."""
        out: dict[int, int] = {}
        for path in self.paths():
            t = pq.read_table(path, columns=["shard", "n_items"])
            out.update(zip(t.column("shard").to_pylist(), t.column("n_items").to_pylist()))
        return out

    def facts(self) -> Iterator[tuple[int, SourceSpec, str, int]]:
        """(shard, spec, kind, item count) of every unit, without its items."""
        specs: dict[str, SourceSpec] = {}
        for path in self.paths():
            t = pq.read_table(path, columns=["shard", "spec", "kind", "n_items"]).to_pydict()
            for shard, spec, kind, n in zip(t["shard"], t["spec"], t["kind"], t["n_items"]):
                yield shard, specs.get(spec) or specs.setdefault(spec, SourceSpec(**json.loads(spec))), kind, n


def _units(table: pa.Table) -> Iterator[WorkUnit]:
    cols = table.to_pydict()
    for i, shard in enumerate(cols["shard"]):
        yield WorkUnit(shard, SourceSpec(**json.loads(cols["spec"][i])), cols["kind"][i], cols["location"][i], tuple(json.loads(cols["items"][i])))


def read_plan_unit(path: str | Path, shard: int) -> WorkUnit:
    """The unit ``shard`` of one plan file, reading only the row group that holds it (by the
    row groups' ``shard`` statistics): what an ingest worker does instead of being sent it."""
    pf = pq.ParquetFile(path)
    col = pf.schema_arrow.get_field_index("shard")
    for g in range(pf.metadata.num_row_groups):
        stats = pf.metadata.row_group(g).column(col).statistics
        if stats is not None and stats.has_min_max and not stats.min <= shard <= stats.max:
            continue
        for unit in _units(pf.read_row_group(g)):
            if unit.shard == shard:
                return unit
    raise KeyError(f"shard {shard} is not in plan file {path}")
