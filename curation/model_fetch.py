"""Downloading weights into the cache: resumable, checksummed, installed only when verified.

A download goes to ``<file>.partial`` beside its destination. An interrupted one is resumed
with an HTTP ``Range`` request (a server that ignores the range sends the whole file again,
which is detected and restarted). Only a complete file whose sha256 matches the expected one
is renamed into place, so the cache never holds a truncated or tampered file under a real name;
a mismatch deletes the partial file and installs nothing.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from curation import __version__
from curation.models import ModelEntry, WeightsError, expected_sha256, record_checksum

CHUNK = 1 << 20
USER_AGENT = f"curation/{__version__} (curate models fetch)"


class DownloadError(WeightsError):
    """A download that did not finish; the partial file is kept for a resume when useful."""


class NetworkUnreachable(DownloadError):
    """No connection could be made at all (offline machine, DNS, firewall)."""


class ChecksumMismatch(WeightsError):
    """The bytes are not the expected ones; nothing was installed."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _progress(enabled: bool):
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    return Progress(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        console=Console(stderr=True), disable=not enabled,
    )


def download(url: str, dest: Path, sha256: str | None, *, label: str = "", progress: bool = True, timeout: float = 30.0) -> str:
    """Download ``url`` to ``dest`` (resuming ``dest.partial``); returns the file's sha256.

    Raises ``ChecksumMismatch`` (nothing installed, partial file removed), ``NetworkUnreachable``
    (no connection) or ``DownloadError`` (HTTP error, or the transfer broke off: run again to
    resume)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".partial")
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT, **({"Range": f"bytes={have}-"} if have else {})}
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the partial file already holds everything
            return _install(part, dest, url, sha256)
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, socket.timeout, ConnectionError) as e:
        raise NetworkUnreachable(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    with resp:
        resumed = have > 0 and resp.status == 206
        if not resumed:
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        size = have
        with open(part, "ab" if resumed else "wb") as f, _progress(progress) as bar:
            task = bar.add_task(label or dest.name, total=total, completed=have)
            try:
                while block := resp.read(CHUNK):
                    f.write(block)
                    size += len(block)
                    bar.update(task, completed=size)
            except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as e:
                f.flush()
                raise DownloadError(f"{url}: the transfer broke off at {size:,} of {total or '?'} bytes ({e.__class__.__name__}); run the command again to resume") from None
    if total is not None and size != total:
        raise DownloadError(f"{url}: the transfer broke off at {size:,} of {total:,} bytes; run the command again to resume")
    return _install(part, dest, url, sha256)


def _install(part: Path, dest: Path, url: str, sha256: str | None) -> str:
    digest = sha256_file(part)
    if sha256 is not None and digest != sha256:
        part.unlink()
        raise ChecksumMismatch(f"{url}: sha256 {digest} is not the expected {sha256}; nothing was installed (the download was deleted)")
    os.replace(part, dest)
    return digest


@dataclass
class Fetched:
    entry: ModelEntry
    status: str  # "present" (already there, checksum ok) or "fetched"
    sha256: str


def fetch(e: ModelEntry, *, trust_on_first_use: bool = False, progress: bool = True) -> Fetched:
    """Install one registry entry into the cache (a no-op when it is there and verifies)."""
    expected = expected_sha256(e)
    if e.path.is_file():
        digest = sha256_file(e.path)
        if expected is not None and digest != expected:
            raise ChecksumMismatch(f"{e.path} exists but its sha256 {digest} is not the expected {expected}; delete it to fetch it again")
        if expected is None and trust_on_first_use:
            record_checksum(e, digest, "present in the cache before its first fetch")
        return Fetched(e, "present", digest)
    if expected is None and not trust_on_first_use:
        raise WeightsError(
            f"{e.name}: upstream publishes no sha256 for {e.url}, so the download cannot be verified. "
            f"Pass --trust-on-first-use to accept it (its sha256 is recorded in the cache's checksums.json, "
            f"enforced on re-fetch and checked by `curate models verify`), or put a file you checked yourself at {e.path}"
        )
    url = e.source_url()
    digest = download(url, e.path, expected, label=e.name, progress=progress)
    record_checksum(e, digest, url)
    return Fetched(e, "fetched", digest)


def verify(e: ModelEntry) -> tuple[str, str]:
    """(status, detail): ``ok``, ``mismatch``, ``missing`` or ``unchecked`` (no checksum known)."""
    if not e.path.is_file():
        return "missing", str(e.path)
    expected = expected_sha256(e)
    digest = sha256_file(e.path)
    if expected is None:
        return "unchecked", f"sha256 {digest}: no pinned or recorded checksum to compare with"
    if digest != expected:
        return "mismatch", f"sha256 {digest}, expected {expected}"
    return "ok", f"sha256 {digest}" + ("" if e.sha256 else " (recorded at first use)")
