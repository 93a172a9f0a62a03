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

    def __init__(self, shard: int, role: str, source: str, seed_dataset: str | None):
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
            schema.DROP_REASON: reason,
            schema.DROP_DETAILS: None if details is None else json.dumps(details, sort_keys=True, default=str),
        }

    def table(self) -> pa.Table:
        rows = [self._rows[i] for i in sorted(self._rows)]
        return pa.Table.from_pylist(rows, schema=OUTPUT_SCHEMA)
