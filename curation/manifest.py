"""The manifest: the one file the downstream trainer reads.

It lists the dataset shards (path, rows, sha256; ``dataset`` adds the column contract, every
column's meaning and the WebDataset shards when written), the counts from the ledger (input = kept +
sum of dropped, checked here), per seed dataset what Table 15 of the DINOv2 paper reports,
per stage what it removed, and every warning (e.g. a safety filter that was NOT applied).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def build_manifest(facts: RunFacts, stages, seconds: float) -> dict:
    store = facts.store
    ledger = ledger_mod.read_ledger(store.ledger_root, columns=ledger_mod.SUMMARY_COLUMNS)
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
