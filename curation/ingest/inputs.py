"""A cheap fingerprint of the inputs a plan was made from, to notice when they change.

A resumed run reuses its plan, so files added to a pool afterwards would appear neither in the
dataset nor in the ledger. ``fingerprint_inputs`` records, for every path the plan reads, its
size and modification time (``os.stat``, no file is opened): each file of a folder (the same
selection the plan makes: the tar shards, else the Parquet files, else every image file), and
each tar shard, Parquet file or URL list named directly. ``compare`` tells what changed:
new, removed and modified inputs, with example paths.

The cost is one ``stat`` per input file, on every check. It misses a rewrite that keeps both
size and mtime (``cp -p`` of equal-sized files); content hashes would catch it at the price of
reading every byte.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field

from curation.ingest.errors import IngestError
from curation.ingest.plan import SourceSpec, folder_inputs, resolve_paths

FORMAT = "curation.inputs/1"
SELF = "."  # the key of a root that is itself a file
Stat = tuple[int, int]  # (size in bytes, mtime in ns); (-1, -1) when stat fails


def _stat(path: str) -> Stat:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1)
    return (st.st_size, st.st_mtime_ns)


@dataclass
class InputFingerprint:
    """``roots``: absolute input path -> {path relative to it (``.`` for the root file): stat}.
    ``missing``: spec paths that named nothing when the fingerprint was taken."""

    roots: dict[str, dict[str, Stat]] = field(default_factory=dict)
    missing: list[str] = field(default_factory=list)

    @property
    def digest(self) -> str:
        payload = json.dumps([sorted((r, sorted(e.items())) for r, e in self.roots.items()), sorted(self.missing)])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    @property
    def num_files(self) -> int:
        return sum(len(e) for e in self.roots.values())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "digest": self.digest,
            "roots": {r: {rel: list(st) for rel, st in sorted(e.items())} for r, e in sorted(self.roots.items())},
            "missing": sorted(self.missing),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "InputFingerprint":
        if d.get("format") != FORMAT:
            raise ValueError(f"not an input fingerprint of format {FORMAT}: {d.get('format')!r}")
        roots = {r: {rel: (int(st[0]), int(st[1])) for rel, st in e.items()} for r, e in d["roots"].items()}
        return cls(roots, list(d.get("missing", [])))


def fingerprint_inputs(specs: Iterable[SourceSpec]) -> InputFingerprint:
    """Size and mtime of every file the plan of ``specs`` reads (a path that is gone is
    recorded as missing rather than raised: ``compare`` reports it)."""
    fp = InputFingerprint()
    for spec in specs:
        try:
            paths = resolve_paths(spec)
        except IngestError:
            fp.missing.append(os.path.abspath(os.path.expanduser(spec.path)))
            continue
        for path in paths:
            if path in fp.roots:
                continue
            if os.path.isdir(path):
                _, rels = folder_inputs(path)
                fp.roots[path] = {rel: _stat(os.path.join(path, *rel.split("/"))) for rel in rels}
            else:
                fp.roots[path] = {SELF: _stat(path)}
    fp.missing = sorted(set(fp.missing))
    return fp


@dataclass
class InputChanges:
    """Absolute paths of inputs that appeared, disappeared or changed size or mtime."""

    new: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.new or self.removed or self.modified)

    def describe(self, examples: int = 3) -> str:
        """``2 new (/pool/a.jpg, /pool/b.jpg), 1 modified (/crawl/00001.tar)``; '' when unchanged."""
        parts = []
        for label, paths in (("new", self.new), ("removed", self.removed), ("modified", self.modified)):
            if paths:
                shown = ", ".join(paths[:examples]) + (f", ... {len(paths) - examples} more" if len(paths) > examples else "")
                parts.append(f"{len(paths)} {label} ({shown})")
        return ", ".join(parts)


def _join(root: str, rel: str) -> str:
    return root if rel == SELF else os.path.join(root, *rel.split("/"))


def compare(stored: InputFingerprint, current: InputFingerprint) -> InputChanges:
    """What changed from ``stored`` to ``current``; falsy when nothing did."""
    changes = InputChanges()
    if stored.digest == current.digest:
        return changes
    for root in sorted(set(stored.roots) | set(current.roots)):
        before, after = stored.roots.get(root, {}), current.roots.get(root, {})
        changes.new += [_join(root, rel) for rel in sorted(after.keys() - before.keys())]
        changes.removed += [_join(root, rel) for rel in sorted(before.keys() - after.keys())]
        changes.modified += [_join(root, rel) for rel in sorted(before.keys() & after.keys()) if before[rel] != after[rel]]
    # A path that named nothing now: its files are listed above; a path never seen is named itself.
    changes.removed += [p for p in current.missing if p not in stored.missing and p not in stored.roots]
    return changes


def inputs_changed(stored: dict, specs: Iterable[SourceSpec], examples: int = 3) -> str | None:
    """The one call a resuming runner needs: ``stored`` is ``InputFingerprint.to_dict()`` as saved
    with the plan; returns a sentence naming the change, or None when the inputs are as planned."""
    changes = compare(InputFingerprint.from_dict(stored), fingerprint_inputs(specs))
    if not changes:
        return None
    return f"the inputs changed since the plan was made: {changes.describe(examples)}"
