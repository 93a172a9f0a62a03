"""WebDataset / img2dataset tar shards.

A sample is the group of members that share a key (the member path up to the first dot of its
file name: ``000/abc.jpg`` and ``000/abc.json`` form sample ``000/abc``). The image member is the
one whose *content* sniffs as an image; ``.json`` (img2dataset writes ``url`` there), ``.cls``
and ``.txt`` members are metadata.

Planning scans headers only and records each member's data offset, so a worker reads exactly its
samples with seeks instead of re-walking the archive. Only uncompressed tars qualify (offsets in a
compressed stream cannot be seeked). A sample containing a member that escapes the archive
(absolute path, ``..``) or is not a regular file (symlink, hard link, device, FIFO) is rejected
as ``unsafe_member``: such members are how crafted archives attack extractors.
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import PurePosixPath

from curation import imaging
from curation.ingest import errors as R
from curation.ingest.rows import RowBuilder
from curation.ingest.url_rules import UrlRules

METADATA_EXTS = frozenset({"json", "txt", "cls", "cls2", "caption", "text", "idx", "index"})
MAX_METADATA_BYTES = 1 << 20
_SNIFF_BYTES = 32


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) by the WebDataset convention: split the file name at its first dot."""
    directory, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{directory}/{stem}" if directory else stem), ext.lower()


def _unsafe_reason(member: tarfile.TarInfo, name: str) -> str | None:
    if member.name.startswith("/"):
        return "absolute path"
    if ".." in PurePosixPath(name).parts:
        return "path escapes the archive (..)"
    if member.issym():
        return f"symbolic link to {member.linkname!r}"
    if member.islnk():
        return f"hard link to {member.linkname!r}"
    if member.ischr() or member.isblk():
        return "device file"
    if member.isfifo():
        return "FIFO"
    if not member.isreg():
        return f"not a regular file (type {member.type!r})"
    return None


def scan_tar(path: str) -> tuple[list[dict], str | None]:
    """Samples of a tar in archive order, and the error that stopped the scan (or None).

    Samples found before a damaged region are kept; the error becomes one ``malformed_shard``
    row so a truncated shard loses only what is really lost.
    """
    samples: dict[str, dict] = {}
    error = None
    try:
        with tarfile.open(path, mode="r:") as tf:
            while True:
                try:
                    member = tf.next()
                except tarfile.TarError as e:
                    error = f"tar damaged after {len(samples)} samples: {e}"
                    break
                if member is None:
                    break
                if member.isdir():
                    continue
                name = member.name.removeprefix("./")
                base = name.rpartition("/")[2]
                if not base or base.startswith("."):
                    continue
                key, _ = sample_key(name)
                sample = samples.setdefault(key, {"key": key, "members": [], "unsafe": None})
                why = _unsafe_reason(member, name)
                if why is not None:
                    if sample["unsafe"] is None:
                        sample["unsafe"] = [member.name, why]
                    continue
                sample["members"].append([name, member.offset_data, member.size])
    except (tarfile.TarError, OSError, EOFError) as e:
        return [], f"cannot open tar: {type(e).__name__}: {e}"
    return list(samples.values()), error


def source_key(location: str, item: dict) -> str:
    member = item["unsafe"][0] if item.get("unsafe") else (item["members"][0][0] if item["members"] else item["key"])
    return f"{location}::{member}"


CAPTION_EXTS = ("txt", "caption", "text")


def read_tar(location: str, items: tuple, max_bytes: int, rules: UrlRules, rows: RowBuilder, extra: list[str] = ()) -> None:
    size = os.path.getsize(location)
    with open(location, "rb") as f:
        for index, item in enumerate(items):
            _read_sample(f, size, location, index, item, max_bytes, rules, rows, list(extra))


def _read_sample(f, tar_size: int, location: str, index: int, item: dict, max_bytes: int, rules: UrlRules, rows: RowBuilder, extra: list[str]) -> None:
    if item.get("unsafe"):
        name, why = item["unsafe"]
        rows.add(index, f"{location}::{name}", None, reason=R.UNSAFE_MEMBER, details={"member": name, "error": why})
        return
    meta = _read_metadata(f, item["members"], extra)
    label, url = meta.get("label"), meta.get("url")
    more = {"caption": meta.get("caption"), "extra": meta.get("extra", {})}
    candidates = [m for m in item["members"] if sample_key(m[0])[1].rpartition(".")[2] not in METADATA_EXTS]
    if not candidates:
        rows.add(index, source_key(location, item), None, reason=R.MISSING_BYTES,
                 details={"error": "sample has no image member", "members": [m[0] for m in item["members"]]}, label=label, url=url, **more)
        return
    chosen = None
    for name, offset, length in candidates:
        if offset + length > tar_size:
            continue
        f.seek(offset)
        if imaging.sniff_format(f.read(min(length, _SNIFF_BYTES))) is not None:
            chosen = (name, offset, length)
            break
    if chosen is None:
        chosen = candidates[0]  # reported as zero_bytes / not_image / cut short below
    name, offset, length = chosen
    key = f"{location}::{name}"
    if offset + length > tar_size:
        rows.add(index, key, None, reason=R.MALFORMED_SHARD,
                 details={"member": name, "error": "member data cut short by the end of the tar"}, label=label, url=url, **more)
        return
    if length > max_bytes:
        rows.add(index, key, None, reason=R.TOO_LARGE, details={"bytes": length, "max_bytes": max_bytes}, label=label, url=url, **more)
        return
    f.seek(offset)
    data = f.read(length)
    block = rules.check(url) if url else None
    if block is not None:
        rows.add(index, key, data, reason=block.reason, details=block.details, label=label, url=url, **more)
        return
    rows.add(index, key, data, label=label, url=url, **more)


def _read_metadata(f, members: list, extra: list[str] = ()) -> dict:
    """``url``, ``label``, ``caption`` and the pass-through keys ``extra`` from a sample's
    ``.json`` / ``.cls`` / ``.txt`` members (img2dataset, webdataset)."""
    out: dict = {"extra": {}}
    for name, offset, length in members:
        ext = sample_key(name)[1].rpartition(".")[2]
        if ext not in ("json", "cls", *CAPTION_EXTS) or length > MAX_METADATA_BYTES:
            continue
        f.seek(offset)
        raw = f.read(length)
        if ext in CAPTION_EXTS:
            text = raw.decode("utf-8", "replace").strip()
            if text:
                out.setdefault("caption", text)
            continue
        if ext == "cls":
            text = raw.decode("utf-8", "replace").strip()
            if text:
                out.setdefault("label", text)
            continue
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            continue
        if not isinstance(doc, dict):
            continue
        if isinstance(doc.get("url"), str):
            out["url"] = doc["url"]
        for field in ("label", "cls", "class"):
            if doc.get(field) is not None and "label" not in out:
                out["label"] = str(doc[field])
        if isinstance(doc.get("caption"), str) and doc["caption"].strip():
            out.setdefault("caption", doc["caption"].strip())
        out["extra"].update({k: doc[k] for k in extra if k in doc})
    return out
