"""The executor: runs shard operations and global stages on Ray.

Per-shard work (ingest, map stages, emit) and the tasks of partitioned global stages all go
through Ray Data: a dataset of pending work items is mapped by tasks, or by an actor pool with
the stage's declared resources for map stages, and every worker reads its inputs from the run
directory and writes its outputs back atomically. Which items are pending is decided from
completion markers, so a re-run resumes at shard or partition granularity.

A global stage runs in one of two forms (``execution.global_stages``):

* ``single_task``: every row it applies to in one Ray task (the fast path for small inputs);
* ``partitioned``: its map / shuffle / reduce steps (``curation.partitioned``), each task bounded
  by ``execution.max_partition_rows`` and ``execution.map_task_rows``;
* ``auto`` (default): single_task up to ``single_task_max_rows`` input rows, partitioned beyond,
  for stages that have a partitioned form.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Callable

import numpy as np

from curation.config import ExecutionConfig, PipelineConfig
from curation.global_ops import run_single_task
from curation.shard_ops import MapShardWorker, StageSpec, emit_shard, ingest_shard
from curation.stage import GlobalStage, MapStage
from curation.store import RunStore, ShardView, StageRecord, read_json

log = logging.getLogger("curation")


def choose_form(stage: GlobalStage, rows: int, execution: ExecutionConfig) -> str:
    """``single_task`` or ``partitioned`` for a global stage with ``rows`` input rows."""
    has_partitioned = stage.partitioned_steps() is not None
    mode = execution.global_stages
    if mode == "partitioned" and not has_partitioned:
        log.warning("stage %s has no partitioned form; it runs as one task", stage.name)
        return "single_task"
    if mode == "auto":
        if rows > execution.single_task_max_rows and not has_partitioned:
            log.warning("stage %s: %d rows in one task (it has no partitioned form yet)", stage.name, rows)
        return "partitioned" if has_partitioned and rows > execution.single_task_max_rows else "single_task"
    return mode


class InProcessTasks:
    """Runs tasks one after another in this process: for tests and debugging (no Ray)."""

    def run_tasks(self, label: str, items: list[dict], fn: Callable[[dict], dict], num_cpus: float = 1.0) -> list[dict]:
        return [fn(item) for item in items]


class RayExecutor:
    def __init__(self, store: RunStore, execution: ExecutionConfig | None = None):
        self.store = store
        self.execution = execution or ExecutionConfig()

    # -- primitive: independent tasks ------------------------------------------------------
    def run_tasks(self, label: str, items: list[dict], fn: Callable[[dict], dict], num_cpus: float = 1.0) -> list[dict]:
        """Run ``fn(item)`` for every item as Ray Data tasks (one item per block); returns the
        results in item order."""
        import ray

        if not items:
            return []
        wait_for_free_cpus()

        def call(batch: dict) -> dict:
            out = [fn(json.loads(i)) for i in batch["item"]]
            return {"pos": np.asarray(batch["pos"]), "result": np.asarray([json.dumps(o) for o in out])}

        rows = [{"pos": i, "item": json.dumps(it)} for i, it in enumerate(items)]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        res = ds.map_batches(call, batch_size=1, num_cpus=num_cpus, **self._task_memory()).take_all()
        res.sort(key=lambda r: int(r["pos"]))
        return [json.loads(r["result"]) for r in res]

    def _task_memory(self) -> dict:
        mem = self.execution.task_memory_bytes
        return {"memory": mem} if mem else {}

    # -- shard stages ----------------------------------------------------------------------
    def run_shards(self, rec: StageRecord, shards: list[int], row_for, fn, options) -> dict:
        """Run ``fn`` over the shards of ``rec`` without a completion marker, one shard per Ray
        Data batch, then mark the stage done with its statistics (read back if already done).
        ``row_for(shard)`` is the dataset row handed to ``fn``; ``options(n_pending)`` gives the
        ``map_batches`` arguments (task or actor-pool resources)."""
        import ray

        if self.store.stage_done(rec):
            return read_json(self.store.stage_marker(rec))["stats"]
        t0 = time.perf_counter()
        pending = [s for s in shards if not self.store.shard_done(rec, s)]
        if pending:
            wait_for_free_cpus()
            ds = ray.data.from_items([row_for(s) for s in pending], override_num_blocks=len(pending))
            ds.map_batches(fn, batch_size=1, **options(len(pending))).materialize()
        stats = self._collect(rec, shards, time.perf_counter() - t0)
        self.store.mark_stage_done(rec, {"stats": stats, "shards": shards})
        return stats

    def _collect(self, rec: StageRecord, shards: list[int], seconds: float) -> dict:
        agg: dict[str, Any] = {"stage": rec.name, "kind": rec.kind, "in": 0, "out": 0, "dropped": {}, "seconds": 0.0, "wall_seconds": round(seconds, 3)}
        for s in shards:
            st = self.store.shard_stats(rec, s)
            agg["in"] += st["in"]
            agg["out"] += st["out"]
            agg["seconds"] += st["seconds"]
            for r, c in st["dropped"].items():
                agg["dropped"][r] = agg["dropped"].get(r, 0) + c
        return agg

    def ingest(self, rec: StageRecord, units: list, ingest_cfg: dict) -> dict:
        by_shard = {u.shard: u for u in units}
        run_dir, record = str(self.store.run_dir), rec.to_dict()

        def fn(batch: dict) -> dict:
            stats = [ingest_shard(run_dir, record, json.loads(u), ingest_cfg) for u in batch["unit"]]
            return {"stats": np.asarray([json.dumps(s) for s in stats])}

        return self.run_shards(
            rec, list(by_shard), lambda s: {"unit": json.dumps(by_shard[s].to_dict())}, fn, lambda n: {"num_cpus": 0.5}
        )

    def map_stage(self, stage: MapStage, spec: StageSpec, cluster_cpus: int, cluster_gpus: int) -> dict:
        import ray

        res = stage.resources()

        def options(n_pending: int) -> dict:
            if res.num_gpus > 0:
                cap = max(1, int(cluster_gpus // res.num_gpus))
            else:
                cap = max(1, int(cluster_cpus // max(res.num_cpus, 0.01)))
            lo, hi = res.concurrency
            hi = max(1, min(hi, cap, n_pending))
            lo = max(1, min(lo, hi))
            return {
                "fn_constructor_kwargs": {"spec": spec.__dict__, "run_dir": str(self.store.run_dir)},
                "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                "num_cpus": res.num_cpus,
                "num_gpus": res.num_gpus or None,
                **({"memory": res.memory_bytes} if res.memory_bytes else {}),
            }

        shards = spec.view(self.store).shards()
        return self.run_shards(spec.rec(), shards, lambda s: {"shard": s}, MapShardWorker, options)

    def emit(self, rec: StageRecord, history: list[StageRecord], as_is: list[str], has_retrieval: bool) -> dict:
        spec = StageSpec("emit", {}, {}, rec.to_dict(), [h.to_dict() for h in history]).__dict__
        run_dir = str(self.store.run_dir)

        def fn(batch: dict) -> dict:
            stats = [emit_shard(run_dir, spec, int(s), as_is, has_retrieval) for s in batch["shard"]]
            return {"stats": np.asarray([json.dumps(s) for s in stats])}

        shards = ShardView(self.store, history).shards()
        return self.run_shards(rec, shards, lambda s: {"shard": s}, fn, lambda n: {"num_cpus": 0.5})

    # -- global stages ---------------------------------------------------------------------
    def global_stage(self, stage: GlobalStage, spec: StageSpec) -> dict:
        rec = spec.rec()
        if not self.store.stage_done(rec):
            view = spec.view(self.store)
            shards = view.shards()
            form = self._form(stage, rec, view, shards)
            if form == "partitioned":
                run_partitioned(stage, spec, self.store, self.execution, self, shards)
            else:
                self._single_task(stage, spec, shards)
        stats = read_json(self.store.stage_marker(rec))
        return {"stage": rec.name, "kind": rec.kind, "wall_seconds": stats["seconds"], **stats}

    def _form(self, stage: GlobalStage, rec: StageRecord, view: ShardView, shards: list[int]) -> str:
        """The form is decided once and kept with the stage, so a resumed run keeps it."""
        from curation.store import write_json_atomic

        path = self.store.stage_dir(rec) / "_form.json"
        if path.exists():
            return read_json(path)["form"]
        rows = sum(view.row_count(s) for s in shards)
        form = choose_form(stage, rows, self.execution)
        write_json_atomic({"form": form, "rows": rows}, path)
        return form

    def _single_task(self, stage: GlobalStage, spec: StageSpec, shards: list[int]) -> None:
        import ray

        res = stage.resources()
        task = ray.remote(run_single_task).options(num_cpus=res.num_cpus, num_gpus=res.num_gpus or 0, max_retries=0)
        ray.get(task.remote(spec.__dict__, str(self.store.run_dir), shards))


def run_partitioned(stage: GlobalStage, spec: StageSpec, store: RunStore, execution: ExecutionConfig, tasks, shards: list[int]) -> dict:
    from curation.partitioned.engine import PartitionedRun

    return PartitionedRun(stage, spec, store, execution, tasks).run(shards)


# ---------------------------------------------------------------------------------------------
# Ray start-up
# ---------------------------------------------------------------------------------------------
def wait_for_free_cpus(timeout: float = 10.0) -> None:
    """The previous stage's actor pool releases its CPUs asynchronously; starting the next
    dataset before that makes Ray Data warn that the cluster has no CPU (and wait anyway)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 0.5:
        time.sleep(0.1)


def init_ray(cfg: PipelineConfig, address: str | None, progress: bool = True) -> None:
    """Join ``address`` (or an ambient cluster when running as a Ray job) or start a local Ray
    that binds its dashboard to loopback."""
    import ray

    if not ray.is_initialized():
        _init(cfg, address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray._private", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _init(cfg: PipelineConfig, address: str | None) -> None:
    import os

    import ray

    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        ray.init(address=address, log_to_driver=True)
        return
    kwargs: dict[str, Any] = {
        "include_dashboard": cfg.ray.include_dashboard,
        "dashboard_host": cfg.ray.dashboard_host,
        "configure_logging": False,
        "log_to_driver": False,
    }
    if cfg.ray.num_cpus:
        kwargs["num_cpus"] = cfg.ray.num_cpus
    if cfg.ray.object_store_memory:
        kwargs["object_store_memory"] = cfg.ray.object_store_memory
    ray.init(**kwargs)
