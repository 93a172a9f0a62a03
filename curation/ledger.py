"""The ledger: every input item's fate, as Parquet under OUT/ledger/<stage>/.

One row per input item overall: a row is written where an item is dropped (with a machine
readable reason and JSON details) or, at the end, where it is kept. ``summarize`` checks that
nothing was counted twice.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from curation import schema

KEPT, DROPPED = "kept", "dropped"

LEDGER_SCHEMA = pa.schema(
    [
        pa.field(schema.UID, pa.int64(), nullable=False),
        pa.field(schema.ID, pa.string()),
        pa.field(schema.ROLE, pa.string()),
        pa.field(schema.SOURCE, pa.string()),
        pa.field(schema.SOURCE_KEY, pa.string()),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("decision", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("details", pa.string()),
    ]
)

LEDGER_BASE_COLUMNS = [schema.ID, schema.ROLE, schema.SOURCE, schema.SOURCE_KEY]


def ledger_rows(base: pa.Table, stage: str, decision: str, reasons=None, details=None) -> pa.Table:
    """Ledger rows for ``base`` (uid + LEDGER_BASE_COLUMNS) with one decision."""
    n = base.num_rows
    cols = {schema.UID: base.column(schema.UID)}
    for c in LEDGER_BASE_COLUMNS:
        cols[c] = base.column(c) if c in base.column_names else pa.nulls(n, pa.string())
    cols["stage"] = pa.array([stage] * n, pa.string())
    cols["decision"] = pa.array([decision] * n, pa.string())
    cols["reason"] = reasons if reasons is not None else pa.nulls(n, pa.string())
    cols["details"] = details if details is not None else pa.nulls(n, pa.string())
    return pa.table(cols).cast(LEDGER_SCHEMA)


def read_ledger(ledger_root: Path, columns=None) -> pa.Table:
    files = sorted(Path(ledger_root).rglob("*.parquet"))
    if not files:
        return LEDGER_SCHEMA.empty_table()
    return pads.dataset([str(f) for f in files], schema=LEDGER_SCHEMA, format="parquet").to_table(columns=columns)


SUMMARY_COLUMNS = [schema.UID, schema.ROLE, schema.SOURCE, "decision", "reason", "stage"]


def summarize(t: pa.Table) -> dict:
    """Counts for the manifest from a ledger table (``read_ledger(root, SUMMARY_COLUMNS)``):
    input = kept + sum(dropped.values())."""
    n = t.num_rows
    uids = t.column(schema.UID)
    duplicates = n - len(pc.unique(uids))
    kept = pc.sum(pc.equal(t.column("decision"), KEPT)).as_py() or 0
    dropped: dict[str, int] = {}
    by_stage: dict[str, dict[str, int]] = {}
    by_role: dict[str, dict[str, int]] = {}
    for row in t.group_by(["decision", "reason", "stage", schema.ROLE]).aggregate([(schema.UID, "count")]).to_pylist():
        c = row[f"{schema.UID}_count"]
        if row["decision"] == DROPPED:
            dropped[row["reason"]] = dropped.get(row["reason"], 0) + c
            by_stage.setdefault(row["stage"], {})
            by_stage[row["stage"]][row["reason"]] = by_stage[row["stage"]].get(row["reason"], 0) + c
        role = by_role.setdefault(row[schema.ROLE] or "unknown", {"input": 0, "kept": 0})
        role["input"] += c
        if row["decision"] == KEPT:
            role["kept"] += c
    return {
        "input": n,
        "kept": kept,
        "dropped": dict(sorted(dropped.items())),
        "dropped_by_stage": by_stage,
        "by_role": by_role,
        "ledger_duplicate_uids": duplicates,
    }
