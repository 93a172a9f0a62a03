"""URL lists (.txt one URL a line, .csv with a header) and the reader of ``urls`` units.

Every URL is checked before any network traffic: a malformed or non-http(s) URL is ``bad_url``
and a URL on a blocklist is ``blocked_domain`` / ``blocked_url``, so a blocked host is never
contacted. The rest are downloaded concurrently (``curation.ingest.http``), which refuses
non-public addresses (``blocked_address``) and opted-out images (``robots_opt_out``); the bodies
are checked like any other image bytes.
"""

from __future__ import annotations

import csv
from typing import Iterator

from curation.config import IngestConfig
from curation.ingest import errors as R
from curation.ingest.http import fetch_urls, url_problem
from curation.ingest.parquet import URL_COLUMNS, metadata_columns, url_record
from curation.ingest.rows import RowBuilder
from curation.ingest.url_rules import UrlRules


def iter_txt(path: str) -> Iterator[str]:
    """One URL a line, read a line at a time; blank lines and ``#`` comment lines are skipped."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            url = line.strip()
            if url and not url.startswith("#"):
                yield url


def iter_csv(path: str, preferred: str | None, cfg: IngestConfig | None = None) -> Iterator:
    """The URL column of a CSV with a header, read a row at a time; ``ValueError`` when there is
    none (raised before the first item) or a row is malformed. With a caption or pass-through
    column, each item is a ``{"url", "caption", "extra"}`` dict."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        try:
            header = reader.fieldnames or []
        except csv.Error as e:
            raise ValueError(f"malformed CSV header: {e}") from None
        column = next((c for c in ([preferred] if preferred else []) + list(URL_COLUMNS) if c in header), None)
        if column is None:
            raise ValueError(f"CSV has no URL column (header: {', '.join(header) or '(empty)'}); set ingest.url_column")
        caption, extra = metadata_columns(header, cfg) if cfg is not None else (None, [])
        try:
            for row in reader:
                url = (row.get(column) or "").strip()
                if caption is None and not extra:
                    yield url
                else:
                    yield url_record(url, row.get(caption) if caption else None, {c: row.get(c) for c in extra})
        except csv.Error as e:
            raise ValueError(f"malformed CSV: {e}") from None


def url_item(item) -> tuple[str, dict]:
    """(URL, its caption/extra metadata) of a plan item: a URL string or a ``url_record``."""
    if isinstance(item, dict):
        return item.get("url") or "", {"caption": item.get("caption"), "extra": item.get("extra") or {}}
    return item, {}


def read_urls(items: tuple, cfg: IngestConfig, rules: UrlRules, rows: RowBuilder) -> None:
    pending: list[int] = []
    parsed = [url_item(i) for i in items]
    for index, (url, meta) in enumerate(parsed):
        problem = url_problem(url)
        if problem is not None:
            rows.add(index, url, None, reason=R.BAD_URL, details={"error": problem}, url=url, **meta)
            continue
        block = rules.check(url.strip())
        if block is not None:
            rows.add(index, url, None, reason=block.reason, details=block.details, url=url, **meta)
            continue
        pending.append(index)
    results = fetch_urls([parsed[i][0].strip() for i in pending], cfg.http, rules)
    for index, res in zip(pending, results):
        url, meta = parsed[index]
        rows.add(
            index,
            url,
            res.body,
            reason=res.reason,
            details=res.details or None,
            url=url,
            final_url=res.final_url,
            http_status=res.status,
            content_type=res.content_type,
            **meta,
        )
