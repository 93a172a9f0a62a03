"""Crawl ingestion: plan deterministic work units over the inputs, then read each unit into rows.

``plan_units`` (driver) -> ``WorkUnit`` dicts (to Ray workers) -> ``read_unit`` -> Arrow table of
``schema.INGEST_SCHEMA`` + ``drop_reason`` / ``drop_details``.
"""

from curation.ingest.errors import IngestError
from curation.ingest.plan import SourceSpec, WorkUnit, plan_units
from curation.ingest.read import OUTPUT_SCHEMA, read_unit

__all__ = ["IngestError", "OUTPUT_SCHEMA", "SourceSpec", "WorkUnit", "plan_units", "read_unit"]
