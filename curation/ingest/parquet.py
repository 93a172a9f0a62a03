"""Parquet inputs: either image bytes per row, or a column of URLs to download.

The bytes column is, in order of preference: ``cfg.bytes_column``, then a binary column named
image / bytes / jpg / jpeg / png / img, or a struct ``{bytes, path}`` as Hugging Face datasets
write their ``Image`` feature. Failing that, a string URL column (``cfg.url_column``, url, URL,
image_url) turns the file into a URL list. A ``label`` column is kept (Hugging Face ``ClassLabel``
integers are mapped to their names); a URL column next to bytes is kept and checked against the
URL blocklists, since it records where the image came from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from curation.config import IngestConfig
from curation.ingest import errors as R
from curation.ingest.rows import RowBuilder
from curation.ingest.url_rules import UrlRules

BYTES_COLUMNS = ("image", "bytes", "jpg", "jpeg", "png", "img")
URL_COLUMNS = ("url", "URL", "image_url")
LABEL_COLUMN = "label"
CAPTION_COLUMNS = ("caption", "text", "TEXT", "alt_text", "alt")


def caption_column(names: list[str], preferred: str | None) -> str | None:
    """The caption column of a Parquet/CSV input: ``ingest.caption_column`` or the first of
    ``CAPTION_COLUMNS`` present."""
    if preferred:
        return preferred if preferred in names else None
    return next((c for c in CAPTION_COLUMNS if c in names), None)


def metadata_columns(names: list[str], cfg: IngestConfig) -> tuple[str | None, list[str]]:
    """(caption column, pass-through columns) that this input has."""
    return caption_column(names, cfg.caption_column), [c for c in cfg.extra_types() if c in names]


@dataclass(frozen=True)
class ParquetLayout:
    kind: str  # "bytes" | "urls"
    column: str
    num_rows: int


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _is_image_struct(t: pa.DataType) -> bool:
    return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0 and _is_binary(t.field("bytes").type)


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def bytes_column(schema: pa.Schema, preferred: str | None) -> str | None:
    for name in ([preferred] if preferred else []) + list(BYTES_COLUMNS):
        i = schema.get_field_index(name)
        if i >= 0 and (_is_binary(schema.field(i).type) or _is_image_struct(schema.field(i).type)):
            return name
    return None


def url_column(names_and_types: pa.Schema, preferred: str | None) -> str | None:
    for name in ([preferred] if preferred else []) + list(URL_COLUMNS):
        i = names_and_types.get_field_index(name)
        if i >= 0 and _is_string(names_and_types.field(i).type):
            return name
    return None


def inspect(path: str, cfg: IngestConfig) -> ParquetLayout:
    """How to read a Parquet file; raises ``ValueError`` when it is unreadable or has no usable
    column (the planner turns that into a ``malformed_shard`` unit)."""
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid, OSError, ...
        raise ValueError(f"cannot read Parquet: {type(e).__name__}: {e}") from None
    schema = pf.schema_arrow
    col = bytes_column(schema, cfg.bytes_column)
    if col is not None:
        return ParquetLayout("bytes", col, pf.metadata.num_rows)
    col = url_column(schema, cfg.url_column)
    if col is not None:
        return ParquetLayout("urls", col, pf.metadata.num_rows)
    wanted = [c for c in (cfg.bytes_column, cfg.url_column) if c]
    raise ValueError(
        f"no image-bytes or URL column (columns: {', '.join(schema.names)}; looked for "
        f"{', '.join(wanted + list(BYTES_COLUMNS) + list(URL_COLUMNS))}); set ingest.bytes_column or ingest.url_column"
    )


def iter_urls(path: str, column: str, cfg: IngestConfig | None = None, batch_rows: int = 65536) -> Iterator:
    """The URLs of a Parquet URL list, read ``batch_rows`` at a time; with a caption or
    pass-through column, each item is a ``{"url", "caption", "extra"}`` dict (``urls.url_item``
    reads both)."""
    pf = pq.ParquetFile(path)
    caption, extra = metadata_columns(pf.schema_arrow.names, cfg) if cfg is not None else (None, [])
    columns = list(dict.fromkeys([column, *([caption] if caption else []), *extra]))
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        values = ["" if v is None else v for v in batch.column(column).to_pylist()]
        if caption is None and not extra:
            yield from values
            continue
        captions = batch.column(caption).to_pylist() if caption else [None] * len(values)
        extras = {c: batch.column(c).to_pylist() for c in extra}
        for i, u in enumerate(values):
            yield url_record(u, captions[i], {c: v[i] for c, v in extras.items()})


def url_record(url: str, caption, extra: dict) -> dict:
    return {"url": url, "caption": None if caption is None else str(caption), "extra": extra}


def source_key(location: str, item: int) -> str:
    return f"{location}::{item}"


def _label_names(pf: pq.ParquetFile) -> list[str] | None:
    """Class names of a Hugging Face ``ClassLabel`` column, from the schema metadata."""
    meta = pf.schema_arrow.metadata or {}
    raw = meta.get(b"huggingface")
    if not raw:
        return None
    try:
        feature = json.loads(raw)["info"]["features"][LABEL_COLUMN]
    except (ValueError, KeyError, TypeError):
        return None
    names = feature.get("names") if isinstance(feature, dict) else None
    return names if isinstance(names, list) else None


def _rows(pf: pq.ParquetFile, columns: list[str], start: int, stop: int) -> pa.Table:
    """Rows [start, stop) reading only the row groups that hold them."""
    groups, offsets, first = [], 0, None
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if offsets + n > start and offsets < stop:
            groups.append(g)
            first = offsets if first is None else first
        offsets += n
    table = pf.read_row_groups(groups, columns=columns)
    return table.slice(start - (first or 0), stop - start)


def read_bytes_rows(location: str, items: tuple, cfg: IngestConfig, rules: UrlRules, rows: RowBuilder) -> None:
    pf = pq.ParquetFile(location)
    schema = pf.schema_arrow
    col = bytes_column(schema, cfg.bytes_column)
    if col is None:
        raise ValueError("the bytes column disappeared since planning")
    url_col = url_column(schema, cfg.url_column)
    has_label = schema.get_field_index(LABEL_COLUMN) >= 0
    caption_col, extra_cols = metadata_columns(schema.names, cfg)
    columns = [col] + ([url_col] if url_col else []) + ([LABEL_COLUMN] if has_label else [])
    columns = list(dict.fromkeys(columns + ([caption_col] if caption_col else []) + extra_cols))
    start, stop = items[0], items[-1] + 1
    table = _rows(pf, columns, start, stop)
    captions = table.column(caption_col).to_pylist() if caption_col else None
    extras = {c: table.column(c).to_pylist() for c in extra_cols}
    images = table.column(col).to_pylist()
    urls = table.column(url_col).to_pylist() if url_col else [None] * len(images)
    labels = table.column(LABEL_COLUMN).to_pylist() if has_label else [None] * len(images)
    names = _label_names(pf) if has_label else None
    for index, row in enumerate(items):
        value, url, label = images[row - start], urls[row - start], labels[row - start]
        data = value.get("bytes") if isinstance(value, dict) else value
        if label is not None and names is not None and isinstance(label, int) and 0 <= label < len(names):
            label = names[label]
        label = None if label is None else str(label)
        key = source_key(location, row)
        meta = {
            "label": label, "url": url, "caption": captions[row - start] if captions else None,
            "extra": {c: v[row - start] for c, v in extras.items()},
        }
        if data is not None and len(data) > cfg.http.max_bytes:
            rows.add(index, key, data, reason=R.TOO_LARGE, details={"bytes": len(data), "max_bytes": cfg.http.max_bytes}, **meta)
            continue
        block = rules.check(url) if url else None
        if block is not None:
            rows.add(index, key, data, reason=block.reason, details=block.details, **meta)
            continue
        details = {"path": value.get("path")} if isinstance(value, dict) and data is None and value.get("path") else None
        rows.add(index, key, data, details=details, **meta)
