"""Reading one work unit into rows: the body of the ingest stage.

``read_unit`` never raises for bad input. An item that cannot be used becomes a row with a
``drop_reason`` (and JSON ``drop_details``) that the runner writes to the ledger; a container
that fails while being read (a tar or Parquet file changed or damaged since planning) turns each
of the unit's remaining items into a ``malformed_shard`` row.
"""

from __future__ import annotations

import pyarrow as pa

from curation.config import IngestConfig
from curation.ingest import errors as R
from curation.ingest import files, parquet, tars, urls
from curation.ingest.errors import IngestError
from curation.ingest.plan import WorkUnit
from curation.ingest.rows import OUTPUT_SCHEMA, RowBuilder
from curation.ingest.url_rules import rules_for

__all__ = ["read_unit", "IngestError", "OUTPUT_SCHEMA"]


def _source_key(unit: WorkUnit, item) -> str:
    if unit.kind == "files":
        return files.source_key(unit.location, item)
    if unit.kind == "tar":
        return tars.source_key(unit.location, item)
    if unit.kind == "parquet":
        return parquet.source_key(unit.location, item)
    if unit.kind == "urls":
        return urls.url_item(item)[0]
    return unit.location


def read_unit(unit: WorkUnit, cfg: IngestConfig) -> pa.Table:
    """One row per item of ``unit``; schema ``OUTPUT_SCHEMA`` (ingest columns + drop columns)."""
    spec = unit.spec
    rows = RowBuilder(unit.shard, spec.role, spec.source, spec.seed_dataset, cfg.extra_types())
    try:
        if unit.kind == "files":
            files.read_files(unit.location, unit.items, cfg.http.max_bytes, rows)
        elif unit.kind == "tar":
            tars.read_tar(unit.location, unit.items, cfg.http.max_bytes, rules_for(cfg.url_rules), rows, list(cfg.extra_types()))
        elif unit.kind == "parquet":
            parquet.read_bytes_rows(unit.location, unit.items, cfg, rules_for(cfg.url_rules), rows)
        elif unit.kind == "urls":
            urls.read_urls(unit.items, cfg, rules_for(cfg.url_rules), rows)
        elif unit.kind == "error":
            for index, item in enumerate(unit.items):
                rows.add(index, unit.location, None, reason=R.MALFORMED_SHARD, details={"location": unit.location, **item})
        else:
            raise IngestError(f"unknown work-unit kind {unit.kind!r}")
    except IngestError:
        raise
    except Exception as e:  # the container failed mid-read: the rest of its items are lost
        details = {"location": unit.location, "error": f"{type(e).__name__}: {e}"}
        for index, item in enumerate(unit.items):
            if index not in rows:
                rows.add(index, _source_key(unit, item), None, reason=R.MALFORMED_SHARD, details=details)
    return rows.table()
