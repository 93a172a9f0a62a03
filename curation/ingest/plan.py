"""Deterministic work units over every input source.

The plan runs on the driver. It walks folders, scans tar headers and reads Parquet metadata in
sorted order and cuts the items into units of at most ``shard_size``, numbering shards densely
over all specs in order, so a re-run of the same inputs yields the same shards and therefore the
same ``uid``s (``schema.make_uid(shard, row)``) -- which is what lets a killed run resume.

What a path holds is decided as follows:

* a glob (``*``, ``?``, ``[``) that is not itself an existing path: every match, sorted;
* a folder holding ``.tar`` files: those tar shards (img2dataset also writes a ``.parquet`` of
  metadata and ``_stats.json`` next to each tar; they are ignored);
* otherwise a folder holding ``.parquet`` files: those Parquet files;
* otherwise a folder: the image files in it (recursively);
* ``.tar``: one tar shard; ``.parquet``: image bytes or URLs, by its columns;
  ``.txt`` / ``.csv``: a URL list.

A path that does not exist or a file of another kind is an ``IngestError``. A container that
cannot be read (damaged tar, unreadable Parquet, CSV without a URL column) does not stop the run:
it becomes a unit of kind ``error`` that yields one ``malformed_shard`` ledger row.
"""

from __future__ import annotations

import glob
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from curation import schema
from curation.config import IngestConfig
from curation.ingest import files, parquet, tars, urls
from curation.ingest.errors import IngestError
from curation.ingest.url_rules import rules_for

KINDS = ("files", "tar", "parquet", "urls", "error")
URL_LIST_SUFFIXES = (".txt", ".csv")
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class SourceSpec:
    path: str
    role: str
    source: str
    seed_dataset: str | None = None


@dataclass(frozen=True)
class WorkUnit:
    shard: int
    spec: SourceSpec
    kind: str
    location: str
    items: tuple

    def to_dict(self) -> dict:
        return {"shard": self.shard, "spec": asdict(self.spec), "kind": self.kind, "location": self.location, "items": list(self.items)}

    @classmethod
    def from_dict(cls, d: dict) -> "WorkUnit":
        return cls(
            shard=int(d["shard"]),
            spec=SourceSpec(**d["spec"]),
            kind=d["kind"],
            location=d["location"],
            items=tuple(d["items"]),
        )


def plan_units(specs: list[SourceSpec], cfg: IngestConfig) -> list[WorkUnit]:
    """Every unit of ``specs`` in a list: for tests and small inputs (a run streams ``iter_units``
    into plan files, ``curation.plan_files``)."""
    return list(iter_units(specs, cfg))


def iter_units(specs: list[SourceSpec], cfg: IngestConfig) -> Iterator[WorkUnit]:
    """Cut every spec into work units as the inputs are read, numbering shards densely; raises
    ``IngestError`` for paths that cannot be planned (possibly after earlier units were yielded)."""
    rules_for(cfg.url_rules)  # a bad blocklist or regex stops the run here, on the driver
    shard = 0
    for spec in specs:
        if spec.role not in schema.ROLES:
            raise IngestError(f"{spec.source}: role {spec.role!r} is not one of {', '.join(schema.ROLES)}")
        before = shard
        for kind, location, items in _spec_chunks(spec, cfg):
            yield WorkUnit(shard, spec, kind, location, tuple(items))
            shard += 1
        if shard == before:
            raise IngestError(f"{spec.source}: {spec.path} holds no input items")


def _spec_chunks(spec: SourceSpec, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    for path in resolve_paths(spec):
        yield from _path_items(path, cfg)


def _cut(kind: str, location: str, items: Iterable, size: int) -> Iterator[tuple[str, str, list]]:
    """Units of at most ``size`` items from a stream of one location's items."""
    chunk: list = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield kind, location, chunk
            chunk = []
    if chunk:
        yield kind, location, chunk


def resolve_paths(spec: SourceSpec) -> list[str]:
    """The absolute paths a spec names (itself, or the sorted matches of a glob)."""
    raw = os.path.expanduser(spec.path)
    if os.path.exists(raw):
        return [os.path.abspath(raw)]
    if _GLOB_CHARS & set(raw):
        matches = sorted(os.path.abspath(p) for p in glob.glob(raw, recursive=True))
        if not matches:
            raise IngestError(f"{spec.source}: no files match {spec.path!r}")
        return matches
    raise IngestError(f"{spec.source}: input path does not exist: {spec.path}")


def _path_items(path: str, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    """Units of one resolved path, each of at most ``cfg.shard_size`` items."""
    if os.path.isdir(path):
        yield from _folder_items(path, cfg)
        return
    suffix = Path(path).suffix.lower()
    if suffix == ".tar":
        yield from _tar_items(path, cfg)
    elif suffix == ".parquet":
        yield from _parquet_items(path, cfg)
    elif suffix in URL_LIST_SUFFIXES:
        yield from _url_list_items(path, cfg)
    else:
        raise IngestError(
            f"{path}: unknown input kind {suffix or '(no extension)'!r}; give a folder, a .tar shard, "
            "a .parquet file, or a URL list (.txt / .csv)"
        )


def folder_inputs(root: str) -> tuple[str, Iterator[str]]:
    """What a folder holds for the plan: (``tar`` | ``parquet`` | ``files``, its relative paths
    in sorted order, listed as they are consumed). Deciding the kind walks the tree once (up to
    the first ``.tar``), holding no listing."""
    seen_parquet = False
    for rel in files.walk_files(Path(root)):
        low = rel.lower()
        if low.endswith(".tar"):
            return "tar", (r for r in files.walk_files(Path(root)) if r.lower().endswith(".tar"))
        seen_parquet = seen_parquet or low.endswith(".parquet")
    if seen_parquet:
        return "parquet", (r for r in files.walk_files(Path(root)) if r.lower().endswith(".parquet"))
    return "files", files.walk_files(Path(root))


def _folder_items(root: str, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    kind, rels = folder_inputs(root)
    if kind == "files":
        yield from _cut("files", root, rels, cfg.shard_size)
        return
    for rel in rels:
        path = files.source_key(root, rel)
        yield from (_tar_items(path, cfg) if kind == "tar" else _parquet_items(path, cfg))


def _error(location: str, message: str) -> tuple[str, str, list]:
    return "error", location, [{"error": message}]


def _tar_items(path: str, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    # One tar's samples are held while it is scanned: a sample's members need not be adjacent.
    samples, error = tars.scan_tar(path)
    yield from _cut("tar", path, samples, cfg.shard_size)
    if error is not None:
        yield _error(path, error)


def _parquet_items(path: str, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    """Row numbers of an image Parquet; the URLs of a URL Parquet, read a batch at a time. A file
    that fails part-way keeps the units before the damage and ends in one error unit."""
    try:
        layout = parquet.inspect(path, cfg)
        if layout.kind == "urls":
            yield from _cut("urls", path, parquet.iter_urls(path, layout.column, cfg), cfg.shard_size)
            return
    except Exception as e:  # unreadable file or row data: one malformed_shard row
        yield _error(path, str(e))
        return
    for start in range(0, layout.num_rows, cfg.shard_size):
        yield "parquet", path, list(range(start, min(start + cfg.shard_size, layout.num_rows)))


def _url_list_items(path: str, cfg: IngestConfig) -> Iterator[tuple[str, str, list]]:
    """A URL list read line by line; a read error part-way keeps the units before it and ends in
    one error unit (like a damaged tar)."""
    try:
        if path.lower().endswith(".csv"):
            items = urls.iter_csv(path, cfg.url_column, cfg)
        else:
            items = urls.iter_txt(path)
        yield from _cut("urls", path, items, cfg.shard_size)
    except (ValueError, OSError, UnicodeDecodeError) as e:
        yield _error(path, f"cannot read URL list: {e}")
