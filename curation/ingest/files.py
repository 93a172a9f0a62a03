"""Folders of image files (crawl dumps, and seed sets laid out as ``<class>/<image>``).

Hidden files and folders are skipped. Symbolic links are listed like files, but one that
resolves outside the root is rejected at read time (``unsafe_path``): a crawl folder must not
be able to pull ``/etc`` or a home directory into the dataset. Symlinked folders inside the root
are not descended into (their content is already reachable, and links can form cycles).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Iterator

from curation.ingest import errors as R
from curation.ingest.rows import RowBuilder


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def walk_files(root: Path) -> Iterator[str]:
    """Relative POSIX paths of every candidate item under ``root``, in sorted order, one folder
    listed at a time. Entries of a folder are sorted with folders keyed ``name/``: a depth-first
    walk in that order gives exactly the sorted order of the full relative paths (``/`` sorts
    after every other character a name can hold before it), without holding the whole tree."""
    root_real = os.path.realpath(root)
    stack = [iter(_entries(str(root), "", root_real))]
    while stack:
        entry = next(stack[-1], None)
        if entry is None:
            stack.pop()
        elif entry[1] is None:
            yield entry[0]
        else:
            stack.append(iter(_entries(entry[1], entry[0] + "/", root_real)))


def _entries(path: str, prefix: str, root_real: str) -> list[tuple[str, str | None]]:
    """(relative path, folder path to descend or None for an item) of one folder, sorted."""
    out: list[tuple[str, str, str | None]] = []
    try:
        with os.scandir(path) as it:
            for e in it:
                if _hidden(e.name):
                    continue
                try:
                    is_dir = e.is_dir()
                except OSError:
                    is_dir = False
                if not is_dir:
                    out.append((e.name, prefix + e.name, None))
                elif not e.is_symlink():
                    out.append((e.name + "/", prefix + e.name, e.path))
                elif not _inside(os.path.realpath(e.path), root_real):
                    out.append((e.name, prefix + e.name, None))  # reported as unsafe_path at read time
    except OSError:  # an unreadable folder holds nothing we can list (as os.walk has it)
        return []
    out.sort()
    return [(rel, descend) for _, rel, descend in out]


def label_of(rel: str) -> str | None:
    """Seed sets are folders of class subfolders: the first path component is the label."""
    parts = rel.split("/")
    return parts[0] if len(parts) > 1 else None


def source_key(location: str, item: str) -> str:
    return os.path.join(location, *item.split("/"))


def read_files(location: str, items: tuple, max_bytes: int, rows: RowBuilder) -> None:
    root_real = os.path.realpath(location)
    for index, rel in enumerate(items):
        key = source_key(location, rel)
        label = label_of(rel)
        real = os.path.realpath(key)
        if not _inside(real, root_real):
            rows.add(index, key, None, reason=R.UNSAFE_PATH, details={"error": "link leaves the input folder", "resolved": real}, label=label)
            continue
        try:
            st = os.stat(key)
        except OSError as e:
            rows.add(index, key, None, reason=R.READ_ERROR, details={"error": f"{type(e).__name__}: {e}"}, label=label)
            continue
        if not stat.S_ISREG(st.st_mode):
            # Never open a FIFO or device: reading it could block or never end.
            rows.add(index, key, None, reason=R.UNSAFE_PATH, details={"error": "not a regular file"}, label=label)
            continue
        if st.st_size > max_bytes:
            rows.add(index, key, None, reason=R.TOO_LARGE, details={"bytes": st.st_size, "max_bytes": max_bytes}, label=label)
            continue
        try:
            with open(key, "rb") as f:
                data = f.read(max_bytes + 1)
        except OSError as e:
            rows.add(index, key, None, reason=R.READ_ERROR, details={"error": f"{type(e).__name__}: {e}"}, label=label)
            continue
        if len(data) > max_bytes:  # grew since stat
            rows.add(index, key, None, reason=R.TOO_LARGE, details={"bytes": len(data), "max_bytes": max_bytes}, label=label)
            continue
        rows.add(index, key, data, label=label)
