"""Crawl ingestion: plan deterministic work units over the inputs, then read each unit into rows.

``iter_units`` (driver, streamed into plan files by ``curation.plan_files``) -> ``WorkUnit`` (read
back by each Ray worker) -> ``read_unit`` -> Arrow table of ``schema.INGEST_SCHEMA`` +
``drop_reason`` / ``drop_details``.
"""

from curation.ingest.errors import IngestError
from curation.ingest.plan import SourceSpec, WorkUnit, iter_units, plan_units
from curation.ingest.read import OUTPUT_SCHEMA, read_unit

__all__ = ["IngestError", "OUTPUT_SCHEMA", "SourceSpec", "WorkUnit", "iter_units", "plan_units", "read_unit"]
