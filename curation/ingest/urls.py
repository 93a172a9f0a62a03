"""URL lists (.txt one URL a line, .csv with a header) and the reader of ``urls`` units.

Every URL is checked before any network traffic: a malformed or non-http(s) URL is ``bad_url``
and a URL on a blocklist is ``blocked_domain`` / ``blocked_url``, so a blocked host is never
contacted. The rest are downloaded concurrently (``curation.ingest.http``), which refuses
non-public addresses (``blocked_address``) and opted-out images (``robots_opt_out``); the bodies
are checked like any other image bytes.
"""

from __future__ import annotations

import csv
import io

from curation.config import IngestConfig
from curation.ingest import errors as R
from curation.ingest.http import fetch_urls, url_problem
from curation.ingest.parquet import URL_COLUMNS
from curation.ingest.rows import RowBuilder
from curation.ingest.url_rules import UrlRules


def read_txt(path: str) -> list[str]:
    """One URL a line; blank lines and ``#`` comment lines are skipped."""
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]


def read_csv(path: str, preferred: str | None) -> list[str]:
    """The URL column of a CSV with a header; ``ValueError`` when there is none."""
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    reader = csv.DictReader(io.StringIO(text))
    try:
        header = reader.fieldnames or []
    except csv.Error as e:
        raise ValueError(f"malformed CSV header: {e}") from None
    column = next((c for c in ([preferred] if preferred else []) + list(URL_COLUMNS) if c in header), None)
    if column is None:
        raise ValueError(f"CSV has no URL column (header: {', '.join(header) or '(empty)'}); set ingest.url_column")
    try:
        return [(row.get(column) or "").strip() for row in reader]
    except csv.Error as e:
        raise ValueError(f"malformed CSV: {e}") from None


def read_urls(items: tuple, cfg: IngestConfig, rules: UrlRules, rows: RowBuilder) -> None:
    pending: list[int] = []
    for index, url in enumerate(items):
        problem = url_problem(url)
        if problem is not None:
            rows.add(index, url, None, reason=R.BAD_URL, details={"error": problem}, url=url)
            continue
        block = rules.check(url.strip())
        if block is not None:
            rows.add(index, url, None, reason=block.reason, details=block.details, url=url)
            continue
        pending.append(index)
    results = fetch_urls([items[i].strip() for i in pending], cfg.http, rules)
    for index, res in zip(pending, results):
        url = items[index]
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
        )
