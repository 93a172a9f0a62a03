"""Reading a finished run for the report: manifest, ledger, dataset, stage outputs, image bytes."""

from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from curation import schema
from curation.ledger import KEPT, read_ledger


class Images:
    """Image bytes by uid: the emitted (possibly blurred) copy if the row was kept, else the
    ingested original. Output shards are rebalanced, so the dataset is searched by uid (only
    its ``uid`` and ``image`` columns are read, and only the row groups that hold those uids)."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        ingest = sorted((run_dir / "stages").glob("*_ingest"))
        self.ingest_dir = ingest[0] if ingest else None
        files = sorted((run_dir / "dataset").glob("part-*.parquet"))
        self.dataset = pads.dataset([str(f) for f in files], format="parquet") if files else None

    def _read(self, path: Path, uids: list[int]) -> dict[int, bytes]:
        if not path.exists():
            return {}
        t = pq.read_table(path, columns=[schema.UID, schema.BYTES], filters=[(schema.UID, "in", uids)])
        return dict(zip(t.column(schema.UID).to_pylist(), t.column(schema.BYTES).to_pylist()))

    def _emitted(self, uids: list[int]) -> dict[int, bytes]:
        if self.dataset is None or not uids:
            return {}
        t = self.dataset.to_table(columns=[schema.UID, "image"], filter=pads.field(schema.UID).isin(uids))
        return dict(zip(t.column(schema.UID).to_pylist(), (i["bytes"] for i in t.column("image").to_pylist())))

    def get(self, uids) -> dict[int, bytes]:
        wanted = sorted(set(int(u) for u in uids))
        out = self._emitted(wanted)
        by_shard: dict[int, list[int]] = defaultdict(list)
        for u in wanted:
            if u not in out:
                by_shard[schema.shard_of_uid(u)].append(u)
        for shard, us in by_shard.items():
            if self.ingest_dir is not None:
                out.update(self._read(self.ingest_dir / f"part-{shard:05d}.parquet", us))
        return out


@dataclass
class RunData:
    run_dir: Path
    manifest: dict
    status: dict
    _ledger: pa.Table | None = field(default=None, repr=False)

    @classmethod
    def load(cls, run_dir: Path) -> "RunData":
        run_dir = Path(run_dir).resolve()
        mpath = run_dir / "manifest.json"
        if not mpath.is_file():
            raise FileNotFoundError(f"{mpath} does not exist: {run_dir} is not a finished run (see `curate status --run {run_dir}`)")
        spath = run_dir / "status.json"
        status = json.loads(spath.read_text()) if spath.is_file() else {}
        return cls(run_dir, json.loads(mpath.read_text()), status)

    @property
    def stage_configs(self) -> list[dict]:
        """Enabled stage entries of the run's config, each with its ``name`` filled in."""
        out = []
        for s in self.manifest.get("config", {}).get("stages", []):
            if s.get("enabled", True):
                out.append({**s, "name": s.get("name") or s.get("kind")})
        return out

    @property
    def stage_kinds(self) -> list[str]:
        return [s.get("kind") for s in self.stage_configs]

    def dataset(self, columns: list[str]) -> pa.Table:
        files = sorted((self.run_dir / "dataset").glob("part-*.parquet"))
        if not files:
            return pa.table({c: pa.array([], pa.null()) for c in columns})
        ds = pads.dataset([str(f) for f in files], format="parquet")
        present = [c for c in columns if c in ds.schema.names]
        return ds.to_table(columns=present)

    def ledger(self, columns=None, filter=None) -> pa.Table:
        if self._ledger is None:  # read once: several sections look at it
            self._ledger = read_ledger(self.run_dir / "ledger")
        t = self._ledger.select(columns) if columns else self._ledger
        return t.filter(filter) if filter is not None else t

    def drops(self, columns=None) -> pa.Table:
        t = self.ledger()
        t = t.filter(pc.not_equal(t.column("decision"), KEPT))
        return t.select(columns) if columns else t

    # -- stage outputs --------------------------------------------------------------------
    def stage_dir(self, name: str) -> Path | None:
        pattern = re.compile(rf"\d+_{re.escape(name)}")
        found = [d for d in sorted((self.run_dir / "stages").glob("*_*")) if pattern.fullmatch(d.name)]
        return found[-1] if found else None

    def stage_output(self, name: str, columns: list[str]) -> pa.Table | None:
        """``uid`` + ``columns`` that stage ``name`` wrote for the rows it kept, or None."""
        d = self.stage_dir(name)
        files = sorted(d.glob("part-*.parquet")) if d else []
        if not files:
            return None
        ds = pads.dataset([str(f) for f in files], format="parquet")
        if not all(c in ds.schema.names for c in columns):
            return None
        return ds.to_table(columns=[schema.UID, *columns])

    def column_writer(self, column: str) -> str | None:
        """The last stage whose outputs hold ``column`` (where later stages read it from)."""
        writer = None
        for s in self.manifest.get("stages", []):
            d = self.stage_dir(s["stage"])
            part = next(iter(sorted(d.glob("part-*.parquet"))), None) if d else None
            if part is not None and column in pq.read_schema(part).names:
                writer = s["stage"]
        return writer

    def passed(self, stage: str, roles: tuple[str, ...] = (schema.POOL,)) -> np.ndarray:
        """Sorted uids (of ``roles``) that went through ``stage`` without being dropped by it
        or before it: their ledger row is written by a later stage, or says kept."""
        order = {s["stage"]: i for i, s in enumerate(self.manifest.get("stages", []))}
        at = order.get(stage)
        t = self.ledger([schema.UID, schema.ROLE, "stage", "decision"])
        if at is None or t.num_rows == 0:
            return np.zeros(0, np.int64)
        later = np.array([order.get(s, len(order)) > at for s in t.column("stage").to_pylist()], bool)
        later |= pc.equal(t.column("decision"), KEPT).to_numpy(zero_copy_only=False)
        later &= pc.fill_null(pc.is_in(t.column(schema.ROLE), pa.array(list(roles))), False).to_numpy(zero_copy_only=False)
        return np.sort(t.column(schema.UID).to_numpy()[later])
