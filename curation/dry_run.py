"""``curate run --dry-run``: what a run would do, with nothing written and Ray not started.

It resolves the configuration (``--set`` included), makes the ingest plan in memory, counting
its units as they are made without keeping them (or reads the one a run directory already
holds), checks every model file, says whether the run directory would be started, resumed or
refused (naming the changed keys), and lists the stages that would run, with the form each
global stage would take.
"""

from __future__ import annotations

from collections.abc import Iterable

import yaml

from curation.executor import choose_form
from curation.ingest.inputs import inputs_changed
from curation.ingest.plan import SourceSpec, WorkUnit, iter_units
from curation.models import WeightsError, check_pipeline, pipeline_needs
from curation.plan_files import Plan
from curation.planning import source_specs
from curation.runlock import RunLocked, check_free
from curation.runner import RunRequest, Runner
from curation.ingest.rows import ingest_columns
from curation.stage import GlobalStage, StageError, check_column_order
from curation.store import read_json


def dry_run(req: RunRequest) -> dict:
    runner = Runner(req)
    store, cfg = runner.store, runner.cfg
    out: dict = {"run_dir": str(store.run_dir), "fingerprint": runner.fingerprint(), "config": cfg.model_dump(mode="json")}
    out["state"], out["detail"] = _state(runner)
    specs = source_specs(req.pools, runner.seeds, runner.excludes)
    stored = _stored_plan(store) if out["state"] == "resume" else None
    change = inputs_changed(stored[1], specs) if stored and stored[1] is not None else None
    if change and req.replan:
        out["state"], out["detail"] = "replan", f"plans again and runs every stage ({change}; --replan)"
    elif change:
        out["state"], out["detail"] = "refused", f"the inputs changed since the plan: {change} (--replan to plan again)"
    reused = stored is not None and out["state"] == "resume"
    facts = stored[0] if reused else ((u.shard, u.spec, u.kind, len(u.items)) for u in iter_units(specs, cfg.ingest))
    out["plan"] = {"reused": reused, "shard_size": cfg.ingest.shard_size, "inputs": _inputs(facts)}
    out["plan"]["items"] = sum(i["items"] for i in out["plan"]["inputs"])
    out["plan"]["shards"] = sum(i["shards"] for i in out["plan"]["inputs"])
    out["weights"] = _weights(req, runner)
    stages = runner._build_stages(preflight=False)
    out["stages"] = _stages(runner, stages, out["plan"]["items"])
    try:
        check_column_order(stages, ingest_columns(cfg.ingest))
    except StageError as e:
        out["state"], out["detail"] = "refused", str(e)
    return out


def _state(runner: Runner) -> tuple[str, str]:
    store = runner.store
    try:
        check_free(store.run_dir)
    except RunLocked as e:
        return "refused", f"busy: {e}"
    if not store.run_json.exists():
        return ("refused", "--resume given but the directory holds no run") if runner.req.resume else ("new", "a new run")
    old = read_json(store.run_json)
    if old.get("fingerprint") != runner.fingerprint():
        return "refused", f"the directory holds a different run; changed: {runner._changes(old)}"
    done = sorted(p.parent.name for p in (store.run_dir / "stages").glob("*/_SUCCESS"))
    return "resume", f"resumes the run there ({len(done)} stage(s) done: {', '.join(done) or 'none'})"


def _stored_plan(store) -> tuple[Iterable, dict | None] | None:
    """(unit facts, input fingerprint) of the plan a run directory holds, read as a resumed run
    would find it, without writing: a ``plan.json`` of an older run is read as it is (a run
    converts it into plan files). None when there is no finished plan."""
    plan = Plan.open(store.plan_dir)
    if plan is not None:
        return plan.facts(), plan.inputs
    if store.legacy_plan_json.exists():
        old = read_json(store.legacy_plan_json)
        units = (WorkUnit.from_dict(u) for u in old["units"])
        return ((u.shard, u.spec, u.kind, len(u.items)) for u in units), old.get("inputs")
    return None


def _inputs(facts: Iterable[tuple[int, SourceSpec, str, int]]) -> list[dict]:
    """Items and shards per source from (shard, spec, kind, item count), one unit at a time."""
    by_source: dict[str, dict] = {}
    for _, spec, kind, n_items in facts:
        s = by_source.setdefault(spec.source, {"source": spec.source, "path": spec.path, "kinds": {}, "items": 0, "shards": 0})
        n = n_items if kind != "error" else 1
        s["kinds"][kind] = s["kinds"].get(kind, 0) + n
        s["items"] += n
        s["shards"] += 1
    return list(by_source.values())


def _weights(req: RunRequest, runner: Runner) -> dict:
    needs = [
        {"stage": n.stage, "model": n.model, "present": n.present, "path": str(n.path) if n.path else None}
        for n in pipeline_needs(runner.cfg)
    ]
    try:
        notes = check_pipeline(runner.cfg, allow_missing=req.allow_missing_weights, seeds=bool(req.seeds), progress=False)
        return {"ok": True, "needs": needs, "notes": notes}
    except WeightsError as e:
        return {"ok": False, "needs": needs, "notes": [str(e)]}


def _stages(runner: Runner, stages: list, items: int) -> list[dict]:
    out = []
    for i, stage in enumerate(stages, start=1):
        entry = {"index": i, "name": stage.name, "kind": stage.config.kind}
        if isinstance(stage, GlobalStage):
            stored = runner.store.run_dir / "stages" / f"{i:02d}_{stage.name}" / "_form.json"
            if stored.exists():
                entry.update(shape="global", form=read_json(stored)["form"], why="kept from the run directory")
            else:
                form = choose_form(stage, items, runner.cfg.execution)
                entry.update(shape="global", form=form, why=_why(stage, items, runner.cfg.execution))
        else:
            entry["shape"] = "map"
        out.append(entry)
    emit = runner.cfg.emit
    size = ", ".join(x for x in (f"{emit.shard_rows:,} rows" if emit.shard_rows else "", f"{emit.shard_bytes:,} bytes" if emit.shard_bytes else "") if x)
    out.append({"index": len(out) + 1, "name": "emit", "kind": "emit", "shape": "emit",
                "formats": emit.formats, "shard_target": size or "one output shard per ingest shard"})
    return out


def _why(stage: GlobalStage, items: int, execution) -> str:
    mode = execution.global_stages
    if stage.partitioned_steps() is None:
        return "it has no partitioned form"
    if mode != "auto":
        return f"execution.global_stages={mode}"
    side = "<=" if items <= execution.single_task_max_rows else ">"
    return f"at most {items:,} input rows {side} execution.single_task_max_rows {execution.single_task_max_rows:,}"


def format_dry_run(d: dict) -> str:
    lines = ["curate run --dry-run: nothing was written, Ray was not started", f"run directory: {d['run_dir']}: {d['state'].upper()}, {d['detail']}",
             f"fingerprint: {d['fingerprint']}", ""]
    plan = d["plan"]
    lines.append(f"plan: {plan['items']:,} input items in {plan['shards']:,} shard(s) of at most {plan['shard_size']:,}"
                 + (" (the run directory's plan)" if plan["reused"] else ""))
    for s in plan["inputs"]:
        kinds = ", ".join(f"{k} {n:,}" for k, n in s["kinds"].items())
        lines.append(f"  {s['source']:<24} {s['items']:>10,} items {s['shards']:>6,} shard(s)  ({kinds})  {s['path']}")
    w = d["weights"]
    lines += ["", f"weights: {'ok' if w['ok'] else 'MISSING (the run would be refused)'}"]
    for n in w["needs"]:
        lines.append(f"  {n['stage']:<16} {n['model']:<32} {'present' if n['present'] else 'MISSING'}  {n['path'] or ''}")
    lines += [f"  {note}" for note in w["notes"]]
    lines += ["", "stages:"]
    for s in d["stages"]:
        if s["shape"] == "global":
            what = f"global, {s['form'].replace('_', ' ')} ({s['why']})"
        elif s["shape"] == "emit":
            what = f"emit: {' + '.join(s['formats'])}, shards of {s['shard_target']}"
        else:
            what = "map"
        lines.append(f"  {s['index']:>2} {s['name']:<20} {what}")
    lines += ["", "resolved configuration:", yaml.safe_dump(d["config"], sort_keys=False).rstrip()]
    return "\n".join(lines)

