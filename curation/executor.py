"""The executor: runs shard operations and global stages on Ray.

Per-shard work (ingest, map stages, emit) and the tasks of partitioned global stages all go
through Ray Data: a dataset of pending work items is mapped by tasks (map stages: set up once
per worker process), or by an actor pool for map stages that need a GPU, and every worker
reads its inputs from the run directory and writes its outputs back atomically. Which items are pending is decided from
completion markers, so a re-run resumes at shard or partition granularity.

A global stage runs in one of two forms (``execution.global_stages``):

* ``single_task``: every row it applies to in one Ray task (the fast path for small inputs);
* ``partitioned``: its map / shuffle / reduce steps (``curation.partitioned``), each task bounded
  by ``execution.max_partition_rows`` and ``execution.map_task_rows``;
* ``auto`` (default): single_task up to ``single_task_max_rows`` input rows, partitioned beyond,
  for stages that have a partitioned form.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
from typing import Any, Callable

import numpy as np

from curation.config import ExecutionConfig, PipelineConfig
from curation.global_ops import run_single_task
from curation.progress import RunProgress
from curation.shard_ops import MapShardWorker, StageSpec, emit_shard, ingest_shard, map_shards_task
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

    def __init__(self, progress: RunProgress | None = None):
        self.progress = progress or RunProgress([], mode="off")

    def run_tasks(self, label: str, items: list[dict], fn: Callable[[dict], dict], num_cpus: float = 1.0) -> list[dict]:
        out = []
        for item in items:
            out.append(fn(item))
            self.progress.advance(stage_of(label), 1)
        return out


def stage_of(label: str) -> str:
    """A task label is ``stage`` or ``stage:step``."""
    return label.split(":", 1)[0]


# Ray failures that say a worker, an actor or a node went away, not that our code raised: the
# pending shards of the stage are run again (their markers say which), up to
# ``execution.stage_retries`` times. Ray Data's own actor restarts are off (max_restarts=0; see
# ``actor_options``), so this is where a map stage survives a lost worker.
SYSTEM_FAILURES = (
    "ActorDiedError", "ActorUnavailableError", "WorkerCrashedError", "NodeDiedError",
    "ObjectLostError", "OwnerDiedError", "OutOfMemoryError", "RaySystemError", "LocalRayletDiedError",
)


def is_system_failure(error: BaseException) -> bool:
    seen = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(cls.__name__ in SYSTEM_FAILURES for cls in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def actor_options() -> dict:
    """Ray Data passes an actor pool's constructor arguments through the object store, and Ray
    core logs an error-level line (core_worker.cc, ray-project/ray#53727, #57733) for every
    restartable actor created that way, although the operator keeps those objects alive. Our map
    actors are not restarted by Ray (``max_restarts=0``): a lost actor fails the dataset, and
    ``run_shards`` reruns the shards without a completion marker (``is_system_failure``).
    Ray Data takes ``max_restarts`` only as a plain keyword (deprecated in 2.60 for the named
    parameters, which do not include it; ``map_batches_quietly`` drops that one warning)."""
    return {"max_restarts": 0}


def map_batches_quietly(ds, fn, **kwargs):
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs)


class RayExecutor:
    def __init__(self, store: RunStore, execution: ExecutionConfig | None = None, progress: RunProgress | None = None):
        self.store = store
        self.execution = execution or ExecutionConfig()
        self.progress = progress or RunProgress([], mode="off")

    # -- primitive: independent tasks ------------------------------------------------------
    def run_tasks(self, label: str, items: list[dict], fn: Callable[[dict], dict], num_cpus: float = 1.0) -> list[dict]:
        """Run ``fn(item)`` for every item as Ray tasks named ``label`` (``stage.step`` in the
        dashboard's task view); returns the results in item order.

        Ray core tasks, not a Ray Data dataset: the items are independent and each reads and
        writes its own files, so a dataset adds only its scheduling loop, which refills a free
        CPU after up to 0.1 s (``WAIT_FOR_TASK_COMPLETION_TIMEOUT_S``): measured here, 112 tasks
        of 0.5 s on 2 CPUs took 36 s through Ray Data and 28 s as tasks, about a quarter of a
        partitioned hash stage's wall time at 4M rows. At most ``2 x`` the tasks the cluster can
        run at once are in flight (the rest wait here, not in Ray's queue); tasks spread over
        the nodes. A task that raises fails the call (its siblings are cancelled; the markers of
        those that finished keep them done); a lost worker is retried by Ray (``max_retries``),
        which the completion markers make safe."""
        import ray

        if not items:
            return []
        task = ray.remote(fn).options(
            num_cpus=num_cpus, name=dataset_name(label), scheduling_strategy="SPREAD", max_retries=3, **self._task_memory()
        )
        slots = max(1, int(ray.cluster_resources().get("CPU", 1) / max(num_cpus, 0.01)))
        window, results, running = 2 * slots, [None] * len(items), {}
        todo = iter(enumerate(items))
        try:
            for pos, item in itertools.islice(todo, window):
                running[task.remote(item)] = pos
            while running:
                ready, _ = ray.wait(list(running), num_returns=1)
                for ref in ready:
                    results[running.pop(ref)] = ray.get(ref)
                    self.progress.advance(stage_of(label), 1)
                    for pos, item in itertools.islice(todo, 1):
                        running[task.remote(item)] = pos
        except BaseException:
            for ref in running:
                ray.cancel(ref)
            raise
        return results

    def _task_memory(self) -> dict:
        mem = self.execution.task_memory_bytes
        return {"memory": mem} if mem else {}

    # -- shard stages ----------------------------------------------------------------------
    def run_shards(self, rec: StageRecord, shards: list[int], row_for, fn, options, total: int | None = None, finish: bool = True) -> dict:
        """Run ``fn`` over the shards of ``rec`` without a completion marker, one shard per Ray
        Data batch, then mark the stage done with its statistics (read back if already done).
        ``row_for(shard)`` is the dataset row handed to ``fn``; ``options(n_pending)`` gives the
        ``map_batches`` arguments (task or actor-pool resources). ``fn`` returns each shard's
        statistics in a ``stats`` column, which feeds the progress display as shards finish;
        ``total`` is the number of images the stage reads (for the display's bar and ETA).
        With ``finish=False`` the stage is left unmarked (emit packs its output afterwards)."""
        if self.store.stage_done(rec):
            stats = read_json(self.store.stage_marker(rec))["stats"]
            self.progress.stage_finished(rec.name, {**stats, "resumed": True})
            return stats
        t0 = time.perf_counter()
        pending = [s for s in shards if not self.store.shard_done(rec, s)]
        waiting = set(pending)
        done_images = sum(int(self.store.shard_stats(rec, s).get("in", 0)) for s in shards if s not in waiting)
        self.progress.stage_started(rec.name, total, "images", done_images, len(shards), len(shards) - len(pending))
        for attempt in range(self.execution.stage_retries + 1):
            pending = [s for s in pending if not self.store.shard_done(rec, s)]
            if not pending:
                break
            try:
                self._map_pending(rec, pending, row_for, fn, options)
                break
            except Exception as e:  # noqa: BLE001 - retried only for lost workers/actors/nodes
                if attempt == self.execution.stage_retries or not is_system_failure(e):
                    raise
                log.warning("stage %s: %s; rerunning its unfinished shards (attempt %d)", rec.name, type(e).__name__, attempt + 2)
        stats = self._collect(rec, shards, time.perf_counter() - t0)
        if finish:
            self.finish_stage(rec, stats, {"shards": shards})
        return stats

    def finish_stage(self, rec: StageRecord, stats: dict, extra: dict | None = None) -> None:
        self.store.mark_stage_done(rec, {"stats": stats, **(extra or {})})
        self.progress.stage_finished(rec.name, stats)

    def _map_pending(self, rec: StageRecord, pending: list[int], row_for, fn, options) -> None:
        import ray

        wait_for_free_cpus()
        ds = ray.data.from_items([row_for(s) for s in pending], override_num_blocks=len(pending))
        ds = map_batches_quietly(ds, fn, batch_size=1, **options(len(pending)))
        ds.set_name(dataset_name(rec.name))
        for row in ds.iter_rows():
            st = json.loads(row["stats"])
            self.progress.advance(rec.name, int(st.get("in", 0)), shards=1)

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

    def ingest(self, rec: StageRecord, plan, ingest_cfg: dict) -> dict:
        """One task per unit of ``plan`` (``curation.plan_files.Plan``). A task is handed its
        shard and plan file and reads its unit there, so the dataset the driver builds holds one
        small row per unit, never the items."""
        run_dir, record = str(self.store.run_dir), rec.to_dict()

        def fn(batch: dict) -> dict:
            stats = [ingest_shard(run_dir, record, f, int(s), ingest_cfg) for f, s in zip(batch["plan_file"], batch["shard"])]
            return {"stats": np.asarray([json.dumps(s, default=plain) for s in stats])}

        return self.run_shards(
            rec, plan.shards(), lambda s: {"shard": s, "plan_file": str(plan.file_of(s))}, fn, lambda n: {"num_cpus": 0.5}, total=plan.num_items
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
            resources = {"num_cpus": res.num_cpus, **({"memory": res.memory_bytes} if res.memory_bytes else {})}
            kwargs = {"spec": spec.__dict__, "run_dir": str(self.store.run_dir)}
            if res.num_gpus == 0:  # tasks; the stage is set up once per worker process
                return {"fn_kwargs": kwargs, "concurrency": hi, **resources}
            return {  # one actor per GPU share holds the model for the whole stage
                "fn_constructor_kwargs": kwargs,
                "compute": ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
                "num_gpus": res.num_gpus,
                **resources,
                **actor_options(),
            }

        view = spec.view(self.store)
        shards = view.shards()
        total = None if self.store.stage_done(spec.rec()) else sum(view.row_count(s) for s in shards)
        worker = MapShardWorker if res.num_gpus > 0 else map_shards_task
        return self.run_shards(spec.rec(), shards, lambda s: {"shard": s}, worker, options, total=total)

    def emit(self, rec: StageRecord, history: list[StageRecord], options: dict) -> dict:
        """Ledger rows per ingest shard, then the output shards (``curation.emit``). ``options``:
        ``as_is`` (seed datasets emitted as they are), ``has_retrieval``, ``emit`` (the
        ``EmitConfig``) and ``extra_types`` (pass-through columns)."""
        from curation import emit as out

        spec = StageSpec("emit", options, {}, rec.to_dict(), [h.to_dict() for h in history]).__dict__
        run_dir = str(self.store.run_dir)

        def fn(batch: dict) -> dict:
            stats = [emit_shard(run_dir, spec, int(s)) for s in batch["shard"]]
            return {"stats": np.asarray([json.dumps(s, default=plain) for s in stats])}

        view = ShardView(self.store, history)
        shards = view.shards()
        done = self.store.stage_done(rec)
        total = None if done else sum(view.row_count(s) for s in shards)
        stats = self.run_shards(rec, shards, lambda s: {"shard": s}, fn, lambda n: {"num_cpus": 0.5}, total=total, finish=False)
        if done:
            return stats
        layout = out.load_or_make_layout(self.store, rec, shards, options)
        n = len(layout["shards"])
        out.remove_stale_outputs(self.store, n)
        pending = [k for k in range(n) if not out.output_marker(self.store, rec, k).exists()]
        self.progress.step(rec.name, "write output shards", total=n, done=n - len(pending))
        items = [{"run_dir": run_dir, "spec": spec, "index": k} for k in pending]
        t0 = time.perf_counter()
        self.run_tasks(f"{rec.name}:write", items, out.write_output_shard, num_cpus=0.5)
        stats["wall_seconds"] = round(stats["wall_seconds"] + time.perf_counter() - t0, 3)
        self.finish_stage(rec, stats, {"shards": shards, "outputs": n})
        return stats

    # -- global stages ---------------------------------------------------------------------
    def global_stage(self, stage: GlobalStage, spec: StageSpec) -> dict:
        rec = spec.rec()
        if not self.store.stage_done(rec):
            view = spec.view(self.store)
            shards = view.shards()
            form = self._form(stage, rec, view, shards)
            self.progress.stage_started(rec.name, None, "tasks", shards=len(shards))
            if form == "partitioned":
                run_partitioned(stage, spec, self.store, self.execution, self, shards)
            else:
                self.progress.steps(rec.name, ["single task"])
                self.progress.step(rec.name, "single task", total=1)
                self._single_task(stage, spec, shards)
                self.progress.advance(rec.name, 1)
        stats = read_json(self.store.stage_marker(rec))
        out = {"stage": rec.name, "kind": rec.kind, "wall_seconds": stats["seconds"], **stats}
        self.progress.stage_finished(rec.name, out)
        return out

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
        task = ray.remote(run_single_task).options(
            num_cpus=res.num_cpus, num_gpus=res.num_gpus or 0, max_retries=0, name=dataset_name(f"{stage.name}:single_task")
        )
        ray.get(task.remote(spec.__dict__, str(self.store.run_dir), shards))


def run_partitioned(stage: GlobalStage, spec: StageSpec, store: RunStore, execution: ExecutionConfig, tasks, shards: list[int]) -> dict:
    from curation.partitioned.engine import PartitionedRun

    return PartitionedRun(stage, spec, store, execution, tasks).run(shards)


# ---------------------------------------------------------------------------------------------
# Ray start-up
# ---------------------------------------------------------------------------------------------
def plain(value: Any) -> Any:
    """JSON for the numpy scalars and arrays a task's facts may hold."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in a task's result is not JSON")


def dataset_name(label: str) -> str:
    """What the dashboard shows for a stage's work: its Ray Data datasets (``decode``,
    ``emit``) and its tasks (``copy_dedup.search``, ``emit.write``); Ray Data appends an id.
    """
    return label.replace(":", ".")


def wait_for_free_cpus(timeout: float = 10.0) -> None:
    """The previous stage's actor pool releases its CPUs asynchronously; starting the next
    dataset before that makes Ray Data warn that the cluster has no CPU (and wait anyway)."""
    import ray

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < 0.5:
        time.sleep(0.1)


def init_ray(cfg: PipelineConfig, address: str | None) -> str | None:
    """Join ``address`` (or an ambient cluster when running as a Ray job) or start a local Ray
    that binds its dashboard to loopback. Returns the dashboard's URL, when one runs.

    Ray Data's own progress bars and its "Starting execution of Dataset ..." lines are off: the
    run's display (``curation.progress``) names stages and counts images, not blocks."""
    import ray

    url = None
    quiet_ray_lines()
    if not ray.is_initialized():
        url = _init(cfg, address)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    for name in ("ray.data", "ray._private", "ray"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return url


def _init(cfg: PipelineConfig, address: str | None) -> str | None:
    import os

    import ray

    address = address or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    if address:
        ctx = ray.init(address=address, log_to_driver=True)
        return _dashboard(ctx)
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
    return _dashboard(ray.init(**kwargs))


# Ray log lines that describe a choice this module made on purpose, each dropped by an exact
# prefix on the logger that emits it (everything else from those loggers still shows):
QUIET_RAY_LINES = {
    # A new local Ray (>= 2.52) turns token authentication on when RAY_AUTH_MODE is unset and
    # says so at every start. That is what we want for a local cluster (dashboard and ports on
    # loopback, the token guarding them too); RAY_AUTH_MODE=disabled still opts out, and Ray's
    # other authentication messages (a missing or wrong token) still show. The variable itself
    # is not set: Ray caches its configuration at import, and a driver whose cache disagrees with
    # the cluster it starts is refused by it.
    "ray._private.authentication.authentication_token_setup": ("Token authentication is enabled for this Ray cluster",),
    # init_ray turns Ray Data's progress bars off (the run's own display replaces them).
    "ray.data._internal.progress": ("Progress bars disabled.",),
}


class _QuietFilter(logging.Filter):
    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet_ray_lines() -> None:
    for name, prefixes in QUIET_RAY_LINES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietFilter) for f in logger.filters):
            logger.addFilter(_QuietFilter(prefixes))


def _dashboard(ctx) -> str | None:
    url = getattr(ctx, "dashboard_url", None)
    if not url:
        return None
    return url if "://" in url else f"http://{url}"
