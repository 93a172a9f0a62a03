"""Turn duplicate components into ledger drops that point at the kept representative."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from curation import schema
from curation.dedup.components import component_sizes, pick_keepers
from curation.dedup.grouping import Passes, star_keepers
from curation.dedup.descriptors import descriptor_matrix
from curation.stage import make_drops


@dataclass
class Rows:
    """The identifying columns of the rows taking part in one deduplication."""

    uid: np.ndarray  # int64
    id: list
    source_key: list
    area: np.ndarray  # width * height, 0 when unknown

    def __len__(self) -> int:
        return len(self.uid)


def role_mask(table: pa.Table, role: str) -> np.ndarray:
    """bool [n]: rows whose ``role`` equals ``role`` (null roles never match)."""
    eq = pc.fill_null(pc.equal(table.column(schema.ROLE), role), False)
    return eq.to_numpy(zero_copy_only=False).astype(bool)


def rows_of(table: pa.Table, mask: np.ndarray) -> Rows:
    """Rows of ``table`` where ``mask`` holds; area is 0 for missing width/height."""
    sub = table.filter(pa.array(mask))
    uid = sub.column(schema.UID).to_numpy().astype(np.int64)

    def col(name: str, default):
        if name not in sub.column_names:
            return [default] * sub.num_rows
        return sub.column(name).to_pylist()

    width = np.array([w or 0 for w in col(schema.WIDTH, 0)], np.float64)
    height = np.array([h or 0 for h in col(schema.HEIGHT, 0)], np.float64)
    return Rows(uid, col(schema.ID, None), col(schema.SOURCE_KEY, None), width * height)


def with_descriptor(table: pa.Table, column: str) -> tuple[Rows, np.ndarray, dict]:
    """The rows that have a descriptor, their float32 [n, d] descriptors, and the counts of rows
    used and left out (no descriptor) for the stage summary."""
    x, valid = descriptor_matrix(table.column(column), column)
    counts = {"rows": int(valid.sum()), "skipped_no_descriptor": int((~valid).sum())}
    return rows_of(table, valid), x[valid], counts


def duplicate_drops(
    rows: Rows,
    labels: np.ndarray,
    reason: str,
    score_name: str,
    score: Callable[[np.ndarray, np.ndarray], np.ndarray],
    passes: Passes | None = None,
) -> tuple[pa.Table, dict]:
    """Drops for every non-kept member of each component, plus summary counts.

    ``score(dropped_idx, kept_idx)`` gives the figure recorded for each drop (cosine similarity
    or Hamming distance between the dropped row and the image kept in its place). Without
    ``passes`` one image per component is kept (``grouping: components``); with it, the star rule
    of ``curation.dedup.grouping`` (``passes(kept_idx, candidate_idx)`` is the stage's test).
    """
    n = len(rows)
    if n == 0:
        return make_drops([], [], []), {"groups": 0, "dropped": 0, "largest_group": 0}
    if passes is None:
        keepers = pick_keepers(labels, rows.area, rows.uid)
    else:
        keepers = star_keepers(labels, rows.area, rows.uid, passes)
    sizes = component_sizes(labels)
    dropped = np.flatnonzero(keepers != np.arange(n))
    kept = keepers[dropped]
    group_size = np.bincount(keepers, minlength=n)  # rows kept in place of each row, itself included
    values = np.asarray(score(dropped, kept)) if len(dropped) else np.zeros(0)
    details = [
        {
            "kept_uid": int(rows.uid[k]),
            "kept_id": rows.id[k],
            "kept_source_key": rows.source_key[k],
            score_name: round(float(v), 4) if isinstance(v, (float, np.floating)) else int(v),
            "component_size": int(sizes[d]),
            **({} if passes is None else {"group_size": int(group_size[k])}),
        }
        for d, k, v in zip(dropped, kept, values)
    ]
    drops = make_drops(rows.uid[dropped], [reason] * len(dropped), details)
    summary = {
        "groups": int((np.bincount(labels) > 1).sum()),
        "dropped": int(len(dropped)),
        "largest_group": int(sizes.max()),
    }
    if passes is not None:
        summary.update({"groups": int((group_size > 1).sum()), "largest_group": int(group_size.max()), "grouping": "star"})
    return drops, summary
