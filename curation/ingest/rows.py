"""Building the table ``read_unit`` returns: one row per work-unit item, kept or dropped.

Ingestion only looks at the header of an image (format, size): full decoding and the
corrupt / truncated / bomb verdicts belong to the decode stage, so a file whose header cannot be
parsed is *kept* here with a null size. What ingestion does reject is content that is empty or
not an image at all.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

from curation import imaging, schema
from curation.ingest import errors as R

OUTPUT_SCHEMA = schema.INGEST_SCHEMA.append(pa.field(schema.DROP_REASON, pa.string())).append(
    pa.field(schema.DROP_DETAILS, pa.string())
)
EXTRA_TYPES = {"string": pa.string(), "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_()}


def extra_fields(types: dict[str, str]) -> list[pa.Field]:
    """Arrow fields of the pass-through columns (``ingest.extra_columns``)."""
    return [pa.field(name, EXTRA_TYPES[t]) for name, t in types.items()]


def ingest_schema(extra_types: dict[str, str]) -> pa.Schema:
    """The ingest stage's stored columns: ``INGEST_SCHEMA`` plus the pass-through columns."""
    out = schema.INGEST_SCHEMA
    for f in extra_fields(extra_types):
        out = out.append(f)
    return out


def ingest_columns(cfg) -> list[str]:
    """Columns the ingest stage writes besides ``uid`` (its ``StageRecord.columns``)."""
    return [n for n in ingest_schema(cfg.extra_types()).names if n != schema.UID]


def _coerce(value: Any, kind: str) -> Any:
    """A pass-through value as its declared type; a value that does not convert is null."""
    if value is None:
        return None
    try:
        if kind == "string":
            return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)
        if kind == "bool":
            if isinstance(value, str):
                return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(value.strip().lower())
            return bool(value)
        if kind == "int64":
            return int(value) if not isinstance(value, float) or value.is_integer() else None
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def content_id(data: bytes | None, source_key: str) -> str:
    """SHA-256 of the bytes; items without bytes get a stable id derived from where they came from."""
    if data is None:
        return hashlib.sha256(("missing:" + source_key).encode()).hexdigest()
    return hashlib.sha256(data).hexdigest()


def classify_image(data: bytes) -> tuple[str | None, dict | None, str | None, int | None, int | None]:
    """(reason, details, format, width, height) from the content only, never from a file name."""
    if len(data) == 0:
        return R.ZERO_BYTES, {"bytes": 0}, None, None, None
    sniffed = imaging.sniff_format(data)
    if sniffed is None:
        return R.NOT_IMAGE, {"error": "content is not a known image format", "head": data[:16].hex()}, None, None, None
    try:
        info = imaging.probe(data)
    except imaging.DecodeError:
        # The decode stage owns corrupt / truncated / bomb verdicts (and reports them).
        return None, None, sniffed, None, None
    return None, None, info.format or sniffed, info.width, info.height


class RowBuilder:
    """Collects rows of one work unit (in any order) and emits them sorted by item index."""

    def __init__(self, shard: int, role: str, source: str, seed_dataset: str | None, extra_types: dict[str, str] | None = None):
        self.extra_types = dict(extra_types or {})
        self.shard = shard
        self.role = role
        self.source = source
        self.seed_dataset = seed_dataset
        self._rows: dict[int, dict[str, Any]] = {}

    def __contains__(self, index: int) -> bool:
        return index in self._rows

    def add(
        self,
        index: int,
        source_key: str,
        data: bytes | None,
        *,
        reason: str | None = None,
        details: dict | None = None,
        label: str | None = None,
        url: str | None = None,
        final_url: str | None = None,
        http_status: int | None = None,
        content_type: str | None = None,
        caption: str | None = None,
        extra: dict | None = None,
    ) -> None:
        """Add item ``index``. With no ``reason`` the content is checked as an image; bytes are
        kept only for rows that survive (the ledger needs the id, not the pixels)."""
        fmt = width = height = None
        if reason is None and data is None:
            reason, details = R.MISSING_BYTES, {**(details or {}), "error": "no image bytes"}
        if reason is None:
            reason, img_details, fmt, width, height = classify_image(data)
            if img_details:
                details = {**(details or {}), **img_details}
                if content_type:
                    details["content_type"] = content_type
        self._rows[index] = {
            schema.UID: schema.make_uid(self.shard, index),
            schema.ID: content_id(data, source_key),
            schema.ROLE: self.role,
            schema.SOURCE: self.source,
            schema.SOURCE_KEY: source_key,
            schema.BYTES: data if reason is None else None,
            schema.FORMAT: fmt,
            schema.WIDTH: width,
            schema.HEIGHT: height,
            schema.SEED_DATASET: self.seed_dataset,
            schema.LABEL: label,
            "url": url,
            "final_url": final_url,
            "http_status": http_status,
            "content_type": content_type,
            "caption": None if caption is None else str(caption),
            **{name: _coerce((extra or {}).get(name), kind) for name, kind in self.extra_types.items()},
            schema.DROP_REASON: reason,
            schema.DROP_DETAILS: None if details is None else json.dumps(details, sort_keys=True, default=str),
        }

    def table(self) -> pa.Table:
        rows = [self._rows[i] for i in sorted(self._rows)]
        out_schema = OUTPUT_SCHEMA
        for f in extra_fields(self.extra_types):
            out_schema = out_schema.append(f)
        return pa.Table.from_pylist(rows, schema=out_schema)
