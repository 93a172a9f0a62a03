"""The planning step: which work units (ingest shards) a run has.

The plan is made once, on the driver, from the pool, seed and exclude sources, and streamed into
plan files under ``RUN/plan/`` as the inputs are read (``curation.plan_files``: the driver never
holds every unit); a re-run reads them back, so shard numbers and therefore uids stay the same
and a killed run resumes where it stopped. A plan killed while being written has no index and is
made again from scratch.

With the plan goes a fingerprint of its inputs (``curation.ingest.inputs``: size and mtime of
every file the plan reads), of the seed and exclude sets as well as the pools: their items are
planned, get uids and end in the ledger like pool items, and a changed seed set would change
retrieval and decontamination without a word. It costs one ``stat`` per input file on each
(re)start, the same order as the listing the plan makes once. A re-run whose inputs changed is
refused with ``InputsChanged`` naming the change; with ``replan`` the outputs made under the old
plan are discarded and a new plan is made, so old and new never mix.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

from curation import schema
from curation.catalog import ResolvedSet
from curation.config import IngestConfig
from curation.ingest.inputs import fingerprint_inputs, inputs_changed
from curation.ingest.plan import SourceSpec, WorkUnit, iter_units
from curation.plan_files import INDEX, Plan, write_plan
from curation.store import RunStore, read_json, write_json_atomic

log = logging.getLogger("curation")


class InputsChanged(RuntimeError):
    """The inputs differ from those the stored plan was made from."""


def source_specs(pools: list[str], seeds: list[ResolvedSet], excludes: list[ResolvedSet]) -> list[SourceSpec]:
    specs = [SourceSpec(str(Path(p).resolve()), schema.POOL, "pool") for p in pools]
    specs += [SourceSpec(s.path, schema.SEED, f"seed:{s.name}", s.name) for s in seeds]
    specs += [SourceSpec(e.path, schema.EXCLUDE, f"exclude:{e.name}", e.name) for e in excludes]
    return specs


def load_or_make_plan(store: RunStore, specs: list[SourceSpec], cfg: IngestConfig, replan: bool = False) -> Plan:
    """The stored plan if its inputs are unchanged, else (with ``replan``) a new one made after
    discarding the old plan's outputs; raises ``InputsChanged`` when they changed without it.
    A replan that was interrupted (its marker is still there) is finished whatever ``replan`` says:
    part of the old outputs is gone, so the old plan cannot be resumed."""
    if store.replan_json.exists():
        log.warning("finishing the re-plan of %s that was interrupted", store.run_dir)
        discard_plan_outputs(store)
    elif (plan := stored_plan(store)) is not None:
        if plan.inputs is None:
            log.warning("%s was made without an input fingerprint: changed inputs go unnoticed", store.plan_dir)
            return plan
        change = inputs_changed(plan.inputs, specs)
        if change is None:
            return plan
        if not replan:
            raise InputsChanged(
                f"{store.run_dir}: {change}. Resuming would leave the changes out of the dataset and the "
                "ledger. Re-run with --replan to plan again from the inputs as they are now (this run's "
                "outputs are discarded and every stage runs again), restore the inputs, or use a new --out."
            )
        log.warning("re-planning %s: %s", store.run_dir, change)
        write_json_atomic({"reason": change}, store.replan_json)
        discard_plan_outputs(store)
    elif store.plan_dir.exists():
        log.warning("the plan in %s was not finished (no %s); planning again", store.plan_dir, INDEX)
    # Fingerprint first: a file that appears while the plan is made shows up as a change on the
    # next start (a refusal), never as an input silently left out of the plan.
    inputs = fingerprint_inputs(specs)
    plan = write_plan(store.plan_dir, iter_units(specs, cfg), inputs.to_dict())
    store.replan_json.unlink(missing_ok=True)
    return plan


def stored_plan(store: RunStore) -> Plan | None:
    """The run directory's finished plan; a ``plan.json`` of an older run is converted first
    (read once, written as plan files, then removed), so a resume never reads it again."""
    plan = Plan.open(store.plan_dir)
    if plan is None and store.legacy_plan_json.exists():
        old = read_json(store.legacy_plan_json)
        plan = write_plan(store.plan_dir, (WorkUnit.from_dict(u) for u in old["units"]), old.get("inputs"))
        store.legacy_plan_json.unlink()
        log.info("converted %s into plan files under %s", store.legacy_plan_json, store.plan_dir)
    return plan


def discard_plan_outputs(store: RunStore) -> None:
    for path in store.plan_outputs():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            os.unlink(path)
