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

from curation.ingest import errors as R
from curation.ingest.rows import RowBuilder


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _inside(path: str, root_real: str) -> bool:
    return path == root_real or path.startswith(root_real.rstrip(os.sep) + os.sep)


def list_files(root: Path) -> list[str]:
    """Relative POSIX paths of every candidate item under ``root``, sorted."""
    root_real = os.path.realpath(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel_dir = os.path.relpath(dirpath, root)
        keep = []
        for d in sorted(dirnames):
            if _hidden(d):
                continue
            full = os.path.join(dirpath, d)
            if os.path.islink(full):
                if not _inside(os.path.realpath(full), root_real):
                    found.append(_rel(rel_dir, d))  # reported as unsafe_path at read time
                continue
            keep.append(d)
        dirnames[:] = keep
        found.extend(_rel(rel_dir, f) for f in filenames if not _hidden(f))
    return sorted(found)


def _rel(rel_dir: str, name: str) -> str:
    return name if rel_dir == "." else Path(rel_dir, name).as_posix()


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
