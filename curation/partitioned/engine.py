"""Run the partitioned form of a global stage: plan, run each step's pending tasks, finalize.

Modelled on datatrove's executors (a task is done when its completion record exists, so a re-run
skips it) and on NeMo Curator's backends (the executor, not the stage, decides where tasks run).
The engine is the driver side: it keeps only per-group and per-partition bookkeeping. Every task
runs ``run_task`` in a worker, which rebuilds the stage from its spec, reads its inputs from
partition files, and writes its outputs and its marker.

State that later tasks and a resumed run must agree on (the groups of shards, the number of rows,
the partitions of every dataset, the facts of aggregates) is written to ``steps/_plan.json``
before the step that depends on it starts.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from curation import schema
from curation.global_ops import empty_base, global_input_columns, global_stats, write_global_shard
from curation.ledger import LEDGER_BASE_COLUMNS
from curation.metrics import record_stage_shard
from curation.partitioned import files
from curation.partitioned.monitor import TaskMonitor
from curation.partitioned.steps import (
    ANNOTATIONS,
    DROPS,
    AggregateStep,
    Artifact,
    ComponentsStep,
    CrossStep,
    MapStep,
    Output,
    PartitionInput,
    PlanState,
    ReduceStep,
    TaskContext,
)
from curation.shard_ops import StageSpec, role_filter
from curation.stage import StageError, empty_drops
from curation.store import RunStore, read_json, split_by_shard, write_json_atomic

log = logging.getLogger("curation")

COUNT, FINALIZE = "_count", "_finalize"


# ---------------------------------------------------------------------------------------------
# Plan state (driver and workers)
# ---------------------------------------------------------------------------------------------
def plan_path(steps_dir: Path) -> Path:
    return steps_dir / "_plan.json"


def load_plan(steps_dir: Path) -> dict:
    return read_json(plan_path(steps_dir)) if plan_path(steps_dir).exists() else {}


def state_of(plan: dict, max_partition_rows: int) -> PlanState:
    return PlanState(
        n_rows=int(plan.get("n_rows", 0)),
        n_groups=len(plan["groups"]),
        max_partition_rows=max_partition_rows,
        dataset_rows=dict(plan.get("dataset_rows", {})),
        facts=dict(plan.get("facts", {})),
    )


def make_groups(counts: dict[int, int], max_rows: int) -> list[list[int]]:
    """Consecutive shards packed into groups of at most ``max_rows`` rows (a larger shard alone)."""
    groups: list[list[int]] = []
    rows = 0
    for shard in sorted(counts):
        if groups and rows + counts[shard] <= max_rows:
            groups[-1].append(shard)
            rows += counts[shard]
        else:
            groups.append([shard])
            rows = counts[shard]
    return groups


# ---------------------------------------------------------------------------------------------
# Worker side
# ---------------------------------------------------------------------------------------------
class _Artifacts:
    def __init__(self, steps_dir: Path, plan: dict):
        self.steps_dir, self.plan, self.cache = steps_dir, plan, {}

    def __call__(self, name: str) -> Artifact:
        if name not in self.cache:
            path = self.steps_dir / name / "artifact.npz"
            arrays = dict(np.load(path)) if path.exists() else {}
            self.cache[name] = Artifact(arrays, self.plan.get("facts", {}).get(name, {}))
        return self.cache[name]


def resolve_step(steps: list, name: str, plan: dict):
    """The step called ``name``: one of the stage's, or a step of a components computation."""
    from curation.partitioned import components

    for step in steps:
        if isinstance(step, ComponentsStep) and (name == step.name or name.startswith(f"{step.name}.r")):
            return components.inner_step(step, name, plan)
        if step.name == name:
            return step
    raise StageError(f"no step named {name!r}")


def run_task(item: dict) -> dict:
    """Run one task of one step (in a Ray worker or in-process) and write its outputs + marker."""
    spec = StageSpec(**item["spec"])
    store = RunStore(item["run_dir"])
    rec = spec.rec()
    steps_dir = store.steps_dir(rec)
    plan = load_plan(steps_dir)
    step_name, task = item["step"], int(item["task"])
    step_dir = steps_dir / step_name
    if files.task_done(step_dir, task):
        return files.read_marker(step_dir, task)["stats"]
    stage = spec.stage()
    monitor = TaskMonitor().start()
    t0 = time.perf_counter()
    view = spec.view(store)
    if step_name in (COUNT, FINALIZE):
        outputs, counters = _builtin(step_name, stage, view, store, rec, plan, task), {}
        counters = outputs.pop("_counters", {})
    else:
        steps = stage.partitioned_steps()
        step = resolve_step(steps, step_name, plan)
        state = state_of(plan, item["max_partition_rows"])
        ctx = TaskContext(
            stage=stage,
            seed=stage.context.seed,
            state=state,
            partitions=plan["partitions"].get(step_name, {}),
            group_of_shard={int(k): v for k, v in plan["group_of_shard"].items()},
            task=task,
            artifacts=_Artifacts(steps_dir, plan),
        )
        outputs = _run_step(step, ctx, view, steps_dir, plan)
        counters = ctx.counters
        if isinstance(step, AggregateStep):
            art = outputs.pop("_artifact")
            if art.arrays:
                _save_npz(step_dir / "artifact.npz", art.arrays)
            counters = {**counters, "_facts": art.facts}
    stats = {"counters": counters, "seconds": round(time.perf_counter() - t0, 4), **monitor.stop()}
    files.write_task_outputs(step_dir, task, outputs, stats)
    return stats


def _save_npz(path: Path, arrays: dict) -> None:
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{uuid.uuid4().hex}.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)


def _dataset(steps_dir: Path, ref: str) -> files.PartitionedDataset | None:
    step, name = ref.split("/")
    d = steps_dir / step
    return files.PartitionedDataset(d, name) if (d / name / "_index.npy").exists() else None


def group_table(view, shards: list[int], columns: list[str], roles) -> pa.Table:
    parts = [view.read(s, columns) for s in shards]
    table = pa.concat_tables(parts) if len(parts) > 1 else parts[0]
    return table.filter(role_filter(table, roles))


def _run_step(step, ctx: TaskContext, view, steps_dir: Path, plan: dict) -> dict:
    if isinstance(step, MapStep):
        stage = ctx.stage
        cols = list(dict.fromkeys([schema.ROLE, *(step.columns or global_input_columns(stage))]))
        table = group_table(view, plan["groups"][ctx.task], cols, stage.roles)
        refs = (step.side_input,) if isinstance(step.side_input, str) else tuple(step.side_input or ())
        ctx.sides = {ref: PartitionInput(_dataset(steps_dir, ref), ctx.task) for ref in refs}
        ctx.side = ctx.sides[refs[0]] if len(refs) == 1 else None
        return step.fn(table, ctx)
    if isinstance(step, CrossStep):
        left, right = cross_pair(plan, step, ctx.task)
        return step.fn(PartitionInput(_dataset(steps_dir, step.left), left), PartitionInput(_dataset(steps_dir, step.right), right), ctx)
    if isinstance(step, ReduceStep):
        ds = _dataset(steps_dir, step.input)
        producer, name = step.input.split("/")
        ctx.input_partitions = int(plan["partitions"].get(producer, {}).get(name, 0))
        if step.whole:
            parts = [] if ds is None else [PartitionInput(ds, int(p)) for p in ds.partitions()]
            return step.fn(parts, ctx)
        if step.side_input:
            ctx.side = PartitionInput(_dataset(steps_dir, step.side_input), ctx.task)
        return step.fn(PartitionInput(ds, ctx.task), ctx)
    if isinstance(step, AggregateStep):
        inputs = {}
        for ref in step.inputs:
            ds = _dataset(steps_dir, ref)
            inputs[ref] = PartitionInput(ds, 0)
        return {"_artifact": step.fn(inputs, ctx)}
    raise StageError(f"cannot run step {step!r} as a task")


def cross_pair(plan: dict, step: CrossStep, task: int) -> tuple[int, int]:
    """(left partition, right partition) of a cross task: task = left * R + right."""
    producer, name = step.right.split("/")
    return divmod(task, max(1, int(plan["partitions"][producer][name])))


def _builtin(name: str, stage, view, store: RunStore, rec, plan: dict, task: int) -> dict:
    shards = plan["groups"][task]
    if name == COUNT:
        n = sum(int(role_filter(view.read(s, [schema.ROLE]), stage.roles).to_numpy(zero_copy_only=False).sum()) for s in shards)
        return {"_counters": {"rows": n}}
    # FINALIZE: this group's drops, split into the per-shard files of the single-task form.
    ds = _dataset(store.steps_dir(rec), plan["drops"])
    drops = PartitionInput(ds, task).read() if ds is not None else None
    drops = drops if drops is not None else empty_drops()
    by_shard = split_by_shard(drops)
    ann_ds = _dataset(store.steps_dir(rec), plan["annotations"]) if plan.get("annotations") else None
    ann = PartitionInput(ann_ds, task).read() if ann_ds is not None else None
    ann_by_shard = split_by_shard(ann) if ann is not None else {}
    reasons: dict[str, int] = {}
    for shard in shards:
        part = by_shard.get(shard, empty_drops())
        base = view.read(shard, LEDGER_BASE_COLUMNS) if part.num_rows else empty_base()
        write_global_shard(store, rec, shard, base, part, ann_by_shard.get(shard), stage.output_schema())
        for r in part.column(schema.DROP_REASON).to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
    return {"_counters": {f"dropped:{k}": v for k, v in reasons.items()}}


# ---------------------------------------------------------------------------------------------
# Driver side
# ---------------------------------------------------------------------------------------------
def merge_counters(stats: list[dict]) -> dict:
    """Sum counters over tasks; ``*_max`` keys keep the maximum, ``*_xor`` keys are xor-ed."""
    out: dict = {}
    for s in stats:
        for k, v in s.get("counters", {}).items():
            if k == "_facts":
                continue
            if k.endswith("_max"):
                out[k] = max(out.get(k, v), v)
            elif k.endswith("_xor"):
                out[k] = out.get(k, 0) ^ int(v)
            else:
                out[k] = out.get(k, 0) + v
    return out


class PartitionedRun:
    """Drive one partitioned global stage to completion (resuming whatever was done before)."""

    def __init__(self, stage, spec: StageSpec, store: RunStore, execution, tasks):
        self.stage, self.spec, self.store, self.execution, self.tasks = stage, spec, store, execution, tasks
        self.rec = spec.rec()
        self.steps_dir = store.steps_dir(self.rec)
        self.view = spec.view(store)
        self.step_stats: dict[str, list[dict]] = {}

    # -- state ---------------------------------------------------------------------------
    def _save(self, plan: dict) -> None:
        write_json_atomic(plan, plan_path(self.steps_dir))

    def _plan(self, shards: list[int]) -> dict:
        plan = load_plan(self.steps_dir)
        if plan:
            return plan
        counts = {s: self.view.row_count(s) for s in shards}
        groups = make_groups(counts, self.execution.map_task_rows)
        plan = {
            "rows_alive": int(sum(counts.values())),
            "groups": groups,
            "group_of_shard": {str(s): g for g, ss in enumerate(groups) for s in ss},
            "partitions": {},
            "dataset_rows": {},
            "facts": {},
            "done": [],
        }
        self._save(plan)
        return plan

    @property
    def state(self) -> PlanState:
        return state_of(self.plan, self.execution.max_partition_rows)

    # -- running -------------------------------------------------------------------------
    def run_step_tasks(self, name: str, tasks: list[int], outputs: list[str], num_cpus: float = 1.0) -> list[dict]:
        """Run ``name``'s pending tasks, then index its outputs; returns every task's stats."""
        step_dir = self.steps_dir / name
        if name not in self.plan["done"]:
            pending = [t for t in tasks if not files.task_done(step_dir, t)]
            self._progress().step(self.rec.name, name, total=len(tasks), done=len(tasks) - len(pending))
            if pending:
                items = [self._item(name, t) for t in pending]
                self.tasks.run_tasks(f"{self.rec.name}:{name}", items, run_task, num_cpus=num_cpus)
            rows = files.build_indexes(step_dir, tasks, outputs)
            self.plan["dataset_rows"].update({f"{name}/{d}": n for d, n in rows.items()})
            self.plan["done"].append(name)
            self._save(self.plan)
        stats = [files.read_marker(step_dir, t)["stats"] for t in tasks]
        self.step_stats[name] = stats
        return stats

    def _progress(self):
        """The executor's progress display (a no-op one for bare task runners)."""
        from curation.progress import RunProgress

        return getattr(self.tasks, "progress", None) or RunProgress([], mode="off")

    def _item(self, name: str, task: int) -> dict:
        return {
            "run_dir": str(self.store.run_dir),
            "spec": self.spec.__dict__,
            "step": name,
            "task": task,
            "max_partition_rows": self.execution.max_partition_rows,
        }

    def set_partitions(self, name: str, outputs: list[Output]) -> None:
        if name not in self.plan["partitions"]:
            self.plan["partitions"][name] = {o.name: o.count(self.state) for o in outputs}
            self._save(self.plan)

    def input_partitions(self, ref: str) -> list[int]:
        ds = _dataset(self.steps_dir, ref)
        return [] if ds is None else [int(p) for p in ds.partitions()]

    def run_step(self, step) -> None:
        from curation.partitioned import components

        n_groups = len(self.plan["groups"])
        if isinstance(step, ComponentsStep):
            components.run(self, step)
            return
        if isinstance(step, MapStep):
            self.set_partitions(step.name, step.outputs)
            self.run_step_tasks(step.name, list(range(n_groups)), [o.name for o in step.outputs])
        elif isinstance(step, ReduceStep):
            self.set_partitions(step.name, step.outputs)
            tasks = [0] if step.whole else self.input_partitions(step.input)
            self.run_step_tasks(step.name, tasks, [o.name for o in step.outputs])
        elif isinstance(step, CrossStep):
            self.set_partitions(step.name, step.outputs)
            producer, name = step.right.split("/")
            width = int(self.plan["partitions"][producer][name])
            tasks = [lp * width + rp for lp in self.input_partitions(step.left) for rp in self.input_partitions(step.right)]
            self.run_step_tasks(step.name, tasks, [o.name for o in step.outputs])
        elif isinstance(step, AggregateStep):
            stats = self.run_step_tasks(step.name, [0], [])
            if step.name not in self.plan["facts"]:
                self.plan["facts"][step.name] = stats[0]["counters"].get("_facts", {})
                self._save(self.plan)

    def run(self, shards: list[int]) -> dict:
        t0 = time.perf_counter()
        self.plan = self._plan(shards)
        n_groups = len(self.plan["groups"])
        counted = self.run_step_tasks(COUNT, list(range(n_groups)), [], num_cpus=0.5)
        if "n_rows" not in self.plan:
            self.plan["n_rows"] = int(sum(s["counters"]["rows"] for s in counted))
            self._save(self.plan)
        steps = self.stage.partitioned_steps()
        self._progress().steps(self.rec.name, [COUNT, *(s.name for s in steps), FINALIZE])
        for step in steps:
            self.run_step(step)
        producer = next((s for s in reversed(steps) if any(o.name == DROPS for o in getattr(s, "outputs", []))), None)
        if producer is None:
            raise StageError(f"stage {self.stage.name}: its partitioned steps write no {DROPS!r} dataset")
        if "drops" not in self.plan:
            self.plan["drops"] = f"{producer.name}/{DROPS}"
            if any(o.name == ANNOTATIONS for o in producer.outputs):
                self.plan["annotations"] = f"{producer.name}/{ANNOTATIONS}"
            self._save(self.plan)
        finals = self.run_step_tasks(FINALIZE, list(range(n_groups)), [], num_cpus=0.5)
        counters = {name: merge_counters(st) for name, st in self.step_stats.items()}
        reasons = {r.split(":", 1)[1]: int(c) for r, c in merge_counters(finals).items()}
        summary = self.stage.partitioned_summary(counters, self.plan["facts"])
        stats = global_stats(
            self.plan["rows_alive"], reasons, time.perf_counter() - t0, summary,
            execution="partitioned", applies_to=self.plan["n_rows"], steps=self._step_report(),
        )
        self.store.mark_stage_done(self.rec, stats)
        record_stage_shard(self.rec.name, stats)
        return stats

    def _step_report(self) -> list[dict]:
        """Per step: tasks, the largest task's peak RSS, the nodes that ran it, seconds."""
        out = []
        for name, stats in self.step_stats.items():
            out.append(
                {
                    "step": name,
                    "tasks": len(stats),
                    "task_seconds": round(sum(s.get("seconds", 0) for s in stats), 3),
                    "peak_rss_mb_max": round(max((s.get("peak_rss_mb", 0) for s in stats), default=0), 1),
                    "nodes": sorted({s.get("node", "?") for s in stats}),
                }
            )
        return out
