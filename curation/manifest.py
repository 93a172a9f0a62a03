"""The manifest: the one file the downstream trainer reads.

It lists the dataset shards (path, rows, sha256; ``dataset`` adds the column contract, every
column's meaning and the WebDataset shards when written), the counts from the ledger, per seed
dataset what Table 15 of the DINOv2 paper reports, per stage what it removed, and every warning
(e.g. a safety filter that was NOT applied). Before any of it is written, the accounting is
checked twice: the ledger against itself (input = kept + sum of dropped, no item twice) and
against the plan (every planned input item has exactly one ledger row, and no row is unplanned),
so a lost ledger file cannot make the counts balance by counting fewer items.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import pyarrow.compute as pc

from curation import ledger as ledger_mod
from curation.contract import CONTRACT
from curation import schema
from curation.catalog import ResolvedSet
from curation.store import RunStore

FORMAT_VERSION = "curation.manifest/1"


@dataclass
class RunFacts:
    """What the driver knows about a finished run; the manifest is built from this alone."""

    store: RunStore
    fingerprint: str
    inputs: dict
    seeds: list[ResolvedSet]
    excludes: list[ResolvedSet]
    stage_stats: list[dict]
    warnings: list[str]
    config: dict
    planned: dict[int, int]  # shard -> number of input items the plan gave it


class AccountingError(RuntimeError):
    """The ledger does not account for the plan's input items exactly once each."""


def _examples(uids: np.ndarray, limit: int = 3) -> str:
    shown = ", ".join(f"shard {u >> schema.UID_SHARD_BITS} row {u & ((1 << schema.UID_SHARD_BITS) - 1)}" for u in uids[:limit].tolist())
    return shown + (f", ... {len(uids) - limit} more" if len(uids) > limit else "")


def _items(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def check_against_plan(uids: Sequence[int], planned: dict[int, int]) -> None:
    """Every planned item (uid ``shard << 20 | row`` for row < ``planned[shard]``) must appear
    exactly once in ``uids`` (the ledger's), and nothing else may; raises ``AccountingError``
    naming missing, unplanned and repeated items (vectorised: no set of every uid is built)."""
    unique, counts = np.unique(np.asarray(uids, dtype=np.int64), return_counts=True)
    shard, row = unique >> schema.UID_SHARD_BITS, unique & ((1 << schema.UID_SHARD_BITS) - 1)
    plan_shards = np.asarray(sorted(planned), dtype=np.int64)
    plan_sizes = np.asarray([planned[s] for s in plan_shards.tolist()], dtype=np.int64)
    in_plan = np.zeros(len(unique), dtype=bool)
    missing: list[int] = []
    if len(plan_shards):
        pos = np.clip(np.searchsorted(plan_shards, shard), 0, len(plan_shards) - 1)
        in_plan = (plan_shards[pos] == shard) & (row < plan_sizes[pos])
        found = np.bincount(pos[in_plan], minlength=len(plan_shards))
        for i in np.flatnonzero(found < plan_sizes).tolist():
            absent = np.setdiff1d(np.arange(plan_sizes[i]), row[in_plan & (pos == i)])
            missing += (int(plan_shards[i]) << schema.UID_SHARD_BITS | absent).tolist()
    problems = []
    if missing:
        problems.append(f"no ledger row for {_items(len(missing), 'planned item')} ({_examples(np.asarray(missing))})")
    if (~in_plan).any():
        problems.append(f"{_items(int((~in_plan).sum()), 'ledger row')} not in the plan ({_examples(unique[~in_plan])})")
    if (counts > 1).any():
        problems.append(f"{_items(int((counts > 1).sum()), 'item')} recorded more than once ({_examples(unique[counts > 1])})")
    if problems:
        raise AccountingError(
            "the ledger does not account for the plan (plan/): " + "; ".join(problems)
            + ". Ledger files were lost or altered after they were written, so this run's accounting "
            "cannot be trusted: run again into a new --out"
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(facts: RunFacts, stages, seconds: float) -> dict:
    store = facts.store
    ledger = ledger_mod.read_ledger(store.ledger_root, columns=ledger_mod.SUMMARY_COLUMNS)
    check_against_plan(ledger.column(schema.UID).to_numpy(), facts.planned)
    counts = ledger_mod.summarize(ledger)
    balance = counts["kept"] + sum(counts["dropped"].values())
    if balance != counts["input"] or counts["ledger_duplicate_uids"]:
        raise RuntimeError(
            f"ledger does not balance: input {counts['input']} != kept {counts['kept']} + dropped "
            f"{sum(counts['dropped'].values())}, or {counts['ledger_duplicate_uids']} items recorded twice"
        )
    dataset = dataset_section(store)
    shards = dataset.pop("parquet_shards")
    for fmt, listed in (("parquet", shards), ("webdataset", dataset.get("webdataset_shards", []))):
        if fmt in dataset["formats"] and sum(s["rows"] for s in listed) != counts["kept"]:
            raise RuntimeError(f"{fmt} output shards and ledger disagree on the number of kept images")
    stage_sections = {}
    for st in stages:
        section = st.manifest_section()
        if section:
            stage_sections[st.name] = section
    retrieval = {}
    for s in facts.stage_stats:
        summ = s.get("summary") or {}
        retrieval.update(summ.get("seed_datasets", {}))
    kept_by_source = _kept_by_source(ledger)
    seeds = {}
    for s in facts.seeds:
        seeds[s.name] = {
            "path": s.path,
            "recipes": list(s.recipes),
            "as_is_kept": kept_by_source.get(f"seed:{s.name}", 0),
            **({"retrieval": retrieval[s.name]} if s.name in retrieval else {}),
        }
    return {
        "format": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "run_dir": str(store.run_dir),
        "fingerprint": facts.fingerprint,
        "counts": counts,
        "shards": shards,
        "columns": [c["name"] for c in dataset["columns"]],
        "dataset": dataset,
        "seeds": seeds,
        "excludes": [e.to_dict() for e in facts.excludes],
        "pools": facts.inputs["pools"],
        "stages": facts.stage_stats,
        "stage_reports": stage_sections,
        "warnings": facts.warnings,
        "config": facts.config,
        "seconds": round(seconds, 2),
    }


def dataset_section(store: RunStore) -> dict:
    """The output shards, per format (from the emit stage's output markers), the column
    contract and every column's meaning."""
    from curation.emit import described_columns, read_outputs

    found = read_outputs(store)
    if found is None:
        raise RuntimeError(f"{store.run_dir}: the emit stage has not written its output shards")
    layout, markers = found
    out: dict = {"contract": CONTRACT, "formats": layout["formats"], "columns": described_columns(layout), "parquet_shards": []}
    for m in markers:
        for fmt, f in m["files"].items():
            key = "parquet_shards" if fmt == "parquet" else f"{fmt}_shards"
            out.setdefault(key, []).append({**f, "rows": m["rows"]})
    return out


def _kept_by_source(ledger) -> dict[str, int]:
    kept = ledger.filter(pc.equal(ledger.column("decision"), ledger_mod.KEPT))
    rows = kept.group_by(schema.SOURCE).aggregate([(schema.UID, "count")]).to_pylist()
    return {r[schema.SOURCE]: r[f"{schema.UID}_count"] for r in rows}
