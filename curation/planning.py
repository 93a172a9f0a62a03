"""The planning step: which work units (ingest shards) a run has.

The plan is made once, on the driver, from the pool, seed and exclude sources, and stored as
``plan.json`` in the run directory; a re-run reads it back, so shard numbers and therefore uids
stay the same and a killed run resumes where it stopped.
"""

from __future__ import annotations

from pathlib import Path

from curation import schema
from curation.catalog import ResolvedSet
from curation.config import IngestConfig
from curation.ingest.plan import SourceSpec, WorkUnit, plan_units
from curation.store import RunStore, read_json, write_json_atomic


def source_specs(pools: list[str], seeds: list[ResolvedSet], excludes: list[ResolvedSet]) -> list[SourceSpec]:
    specs = [SourceSpec(str(Path(p).resolve()), schema.POOL, "pool") for p in pools]
    specs += [SourceSpec(s.path, schema.SEED, f"seed:{s.name}", s.name) for s in seeds]
    specs += [SourceSpec(e.path, schema.EXCLUDE, f"exclude:{e.name}", e.name) for e in excludes]
    return specs


def load_or_make_plan(store: RunStore, specs: list[SourceSpec], cfg: IngestConfig) -> list[WorkUnit]:
    if store.plan_json.exists():
        return [WorkUnit.from_dict(u) for u in read_json(store.plan_json)["units"]]
    units = plan_units(specs, cfg)
    write_json_atomic({"units": [u.to_dict() for u in units]}, store.plan_json)
    return units
