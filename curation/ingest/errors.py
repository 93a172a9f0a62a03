"""Errors and drop reasons of the ingestion layer."""

from __future__ import annotations


class IngestError(ValueError):
    """An input specification that cannot be planned (missing path, unknown kind, bad rule file).

    Raised on the driver before any work starts; the message names the path (and line) to fix.
    Bad *items* (a corrupt tar, a 404) are never raised: they become ledger rows.
    """


# Reasons ingestion writes into ``drop_reason``; later stages own decode-level reasons
# (corrupt, truncated, decompression_bomb).
ZERO_BYTES = "zero_bytes"
NOT_IMAGE = "not_image"
UNSAFE_PATH = "unsafe_path"
UNSAFE_MEMBER = "unsafe_member"
MALFORMED_SHARD = "malformed_shard"
MISSING_BYTES = "missing_bytes"
READ_ERROR = "read_error"
TOO_LARGE = "too_large"
BAD_URL = "bad_url"
BLOCKED_DOMAIN = "blocked_domain"
BLOCKED_URL = "blocked_url"
BLOCKED_ADDRESS = "blocked_address"  # not a public address (SSRF protection)
ROBOTS_OPT_OUT = "robots_opt_out"  # X-Robots-Tag: noai / noimageai
TOO_MANY_REDIRECTS = "too_many_redirects"
TRUNCATED_DOWNLOAD = "truncated_download"
TIMEOUT = "timeout"
CONNECTION_ERROR = "connection_error"


def http_status_reason(status: int) -> str:
    return f"http_{status}"
