"""Run a pipeline: the driver.

It checks the configuration and the run directory (resume or refuse), makes or reads the ingest
plan (``curation.planning``), hands every stage to the executor (``curation.executor``) in
order, and writes the status and the manifest. The work itself is done by pure shard operations
(``curation.shard_ops``) and the global stages' two execution forms (``curation.global_ops``,
``curation.partitioned``), which the executor schedules on Ray.

A run holds the run directory's lock (``curation.runlock``) from before its first write to its
end, so a second run on the same directory is refused at once. ``status.json`` says how the last
attempt ended: ``running`` (with the stage in progress), ``finished``, ``failed`` (the stage and
the error) or ``refused`` (a check said no before any stage ran: a changed configuration or
inputs, an empty pool, missing weights; the previous state is kept beside it). A refusal because
another run holds the lock writes nothing: the directory's status belongs to that run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING
from pathlib import Path

from curation.catalog import ResolvedSet, resolve_excludes, resolve_seeds
from curation.config import ConfigError, PipelineConfig
from curation.run_state import error_fields
from curation.runlock import RunLock, RunLocked, RunLockError
from curation.stage import GlobalStage, Stage, StageContext, StageError, check_column_order, stage_class
from curation.store import GLOBAL, INGEST, MAP, RunStore, StageRecord, read_json, write_json_atomic

# The executor, the planner and the shard operations (Ray Data, pyarrow.dataset, the ingest
# readers) are imported once the lock is held: a second run on a busy directory is refused
# without paying for them.

if TYPE_CHECKING:
    from curation.plan_files import Plan
    from curation.progress import RunProgress

log = logging.getLogger("curation")


class RunError(RuntimeError):
    """A run that cannot start or continue; the message says why and what to do."""


class RunRefused(RunError):
    """A check refused the run before any stage ran (the directory's outputs are untouched)."""


@dataclass
class RunRequest:
    pools: list[str]
    out: Path
    config: PipelineConfig
    seeds: list[str] = field(default_factory=list)
    excludes: list[str] = field(default_factory=list)
    address: str | None = None
    resume: bool = False
    replan: bool = False  # inputs changed since the plan: discard this run's outputs and plan again
    allow_missing_weights: bool = False
    progress: str | bool = "auto"  # auto | live | lines | off (curation.progress); True = auto, False = off
    progress_interval: float = 30.0  # seconds between progress lines without a terminal


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, req: RunRequest):
        self.req = req
        self.cfg = req.config
        self.store = RunStore(req.out)
        self.seeds: list[ResolvedSet] = resolve_seeds(req.seeds, self.cfg)
        self.excludes: list[ResolvedSet] = resolve_excludes(req.excludes, self.cfg)
        self.stage_stats: list[dict] = []
        self.warnings: list[str] = []
        self.history: list[StageRecord] = []
        self.current: str | None = None  # what the run is doing: a stage name, "plan", "manifest"
        self.found_status: dict | None = None  # status.json as this attempt found it
        self.progress: RunProgress | None = None

    # -- identity -----------------------------------------------------------------------------
    def inputs(self) -> dict:
        return {
            "pools": [str(Path(p).resolve()) for p in self.req.pools],
            "seeds": [s.to_dict() for s in self.seeds],
            "excludes": [e.to_dict() for e in self.excludes],
            "allow_missing_weights": self.req.allow_missing_weights,
        }

    def fingerprint(self) -> str:
        payload = json.dumps({"config": self.cfg.fingerprint(), "inputs": self.inputs()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def _check_resume(self) -> None:
        fp = self.fingerprint()
        if self.store.run_json.exists():
            old = read_json(self.store.run_json)
            if old.get("fingerprint") != fp:
                raise RunError(
                    f"{self.store.run_dir} holds a run with a different configuration or inputs "
                    f"(fingerprint {old.get('fingerprint')} != {fp}; changed: {self._changes(old)}); resuming would mix outputs. "
                    "Re-run with the original --config/--set/--seeds/--pool/--exclude, or use a new --out directory."
                )
            log.info("resuming run in %s", self.store.run_dir)
        elif self.req.resume:
            raise RunError(f"--resume given but {self.store.run_dir} holds no run (no run.json)")
        else:
            write_json_atomic(
                {
                    "fingerprint": fp,
                    "config": self.cfg.model_dump(mode="json"),
                    "inputs": self.inputs(),
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                },
                self.store.run_json,
            )

    def _changes(self, old_run: dict) -> str:
        from curation.config_diff import describe_change

        return describe_change(old_run, self.cfg.model_dump(mode="json"), self.inputs())

    def context(self, stage_dir: Path) -> StageContext:
        import ray

        res = ray.cluster_resources() if ray.is_initialized() else {}
        return StageContext(
            run_dir=self.store.run_dir,
            stage_dir=stage_dir,
            seed=self.cfg.seed,
            seeds={s.name: {"path": s.path, "recipes": list(s.recipes)} for s in self.seeds},
            excludes={e.name: {"path": e.path} for e in self.excludes},
            allow_missing_weights=self.req.allow_missing_weights,
            cluster_cpus=int(res.get("CPU", 1)),
            cluster_gpus=int(res.get("GPU", 0)),
        )

    # -- main ---------------------------------------------------------------------------------
    def run(self) -> dict:
        """Lock the run directory, check, plan and execute; status.json tells how it ended."""
        lock = self._lock()
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _lock(self) -> RunLock:
        try:
            lock = RunLock(self.store.run_dir).acquire()
        except RunLocked as e:  # status.json is the holder's: nothing is written
            raise RunRefused(str(e)) from e
        except RunLockError as e:
            raise RunError(str(e)) from e
        if lock.took_over is not None:
            gone = {False: ", which is gone", None: " (on another host)"}.get(lock.took_over.alive(), "")
            log.warning("took over %s from a run that stopped without finishing: %s%s; resuming", self.store.run_dir, lock.took_over.describe(), gone)
        return lock

    def _run_locked(self) -> dict:
        from curation.ingest.errors import IngestError  # the ingest package imports its readers

        t_start = time.perf_counter()
        self.found_status = read_json(self.store.status_json) if self.store.status_json.exists() else None
        try:
            plan = self._checks()
        except (RunError, ConfigError, StageError, IngestError) as e:
            self._status("refused", error=e)
            raise
        except BaseException as e:
            self._status("failed", error=e)
            raise
        try:
            return self._execute(plan, t_start)
        except BaseException as e:
            self._status("failed", self.history, error=e)
            raise

    def _checks(self) -> Plan:
        """Everything that may refuse the run, before Ray starts: pools, stage preflight (missing
        weights stop the run here), the configuration against the directory's, the plan and its inputs."""
        from curation.planning import InputsChanged, load_or_make_plan, source_specs

        for p in self.req.pools:
            if not Path(p).exists():
                raise RunRefused(f"pool path {p} does not exist")
        for source in [*self.req.pools, *(s.path for s in self.seeds), *(e.path for e in self.excludes)]:
            root = Path(source).resolve()
            if root.is_dir() and self.store.run_dir.is_relative_to(root):
                raise RunRefused(
                    f"the run directory {self.store.run_dir} is inside the input folder {root}: the run's own "
                    "files would become inputs (and change on every start). Choose an --out outside it."
                )
        self._build_stages(preflight=True)
        self._check_resume()
        self.current = "plan"
        self._status("running")
        try:
            return load_or_make_plan(self.store, source_specs(self.req.pools, self.seeds, self.excludes), self.cfg.ingest, self.req.replan)
        except InputsChanged as e:
            raise RunRefused(str(e)) from None

    def _execute(self, plan: Plan, t_start: float) -> dict:
        from curation.executor import RayExecutor, init_ray
        from curation.ingest.rows import ingest_columns
        from curation.shard_ops import StageSpec

        dashboard = init_ray(self.cfg, self.req.address)
        stages = self._build_stages(preflight=False)  # now with cluster resources known
        executor = RayExecutor(self.store, self.cfg.execution, self._start_progress(stages, dashboard))
        history = self.history
        ingest_rec = StageRecord(0, "ingest", "ingest", INGEST, ingest_columns(self.cfg.ingest))
        self._begin(ingest_rec.name, history)
        self.stage_stats.append(executor.ingest(ingest_rec, plan, self.cfg.ingest.model_dump(mode="json")))
        history.append(ingest_rec)
        for i, stage in enumerate(stages, start=1):
            shape = GLOBAL if isinstance(stage, GlobalStage) else MAP
            rec = StageRecord(i, stage.name, stage.config.kind, shape, stage.output_schema().names)
            spec = StageSpec(
                stage.config.kind,
                stage.config.model_dump(mode="json"),
                self.context(self.store.stage_dir(rec)).to_dict(),
                rec.to_dict(),
                [h.to_dict() for h in history],
            )
            self._begin(rec.name, history)
            if shape == MAP:
                ctx = self.context(self.store.run_dir)
                self.stage_stats.append(executor.map_stage(stage, spec, ctx.cluster_cpus, ctx.cluster_gpus))
            else:
                self.stage_stats.append(executor.global_stage(stage, spec))
            history.append(rec)
        emit_rec = StageRecord(len(stages) + 1, "emit", "emit", MAP, [])
        self._begin(emit_rec.name, history)
        self.stage_stats.append(executor.emit(emit_rec, history, self._emit_options(stages)))
        history.append(emit_rec)
        self._begin("manifest", history)
        manifest = self._manifest(stages, history, plan.sizes(), time.perf_counter() - t_start)
        self.current = None
        self._status("finished", history)
        return manifest

    def _begin(self, what: str, history: list[StageRecord]) -> None:
        self.current = what
        self._status("running", history)

    def _emit_options(self, stages: list[Stage]) -> dict:
        return {
            "as_is": [s.name for s in self.seeds if any(r["method"] == "as_is" for r in s.recipes)],
            "has_retrieval": any(s.config.kind == "retrieve" for s in stages),
            "emit": self.cfg.emit.model_dump(mode="json"),
            "extra_types": self.cfg.ingest.extra_types(),
        }

    def _start_progress(self, stages: list[Stage], dashboard: str | None) -> RunProgress:
        """The live display or progress lines (``curation.progress``); every report also updates
        status.json, at most every 2 s, so ``curate status --run`` sees inside a long stage."""
        names = ["ingest", *(s.name for s in stages), "emit"]
        from curation.progress import RunProgress

        self.progress = RunProgress(
            names, self.req.progress, self.req.progress_interval,
            on_status=lambda current: self._status("running", self.history),
            status_interval=min(2.0, self.req.progress_interval),
        )
        if dashboard:
            self.progress.note(f"Ray dashboard: {dashboard}")
        return self.progress

    def _build_stages(self, preflight: bool) -> list[Stage]:
        stages: list[Stage] = []
        for i, sc in enumerate(self.cfg.enabled_stages(), start=1):
            cls = stage_class(sc.kind)
            stage = cls(sc, self.context(self.store.run_dir / "stages" / f"{i:02d}_{sc.stage_name}"))
            if preflight:
                self.warnings += list(stage.preflight())
            stages.append(stage)
        if preflight:
            from curation.ingest.rows import ingest_columns

            check_column_order(stages, ingest_columns(self.cfg.ingest))
        return stages

    # -- outputs ------------------------------------------------------------------------------
    def _status(self, state: str, history: list[StageRecord] | None = None, error: BaseException | None = None) -> None:
        status = {
            "state": state,
            "run_dir": str(self.store.run_dir),
            "stage": self.current if state in ("running", "failed") else None,
            "stages_done": [h.name for h in (history or [])],
            "stages": [s.get("stage") for s in self.stage_stats],
            "stats": self.stage_stats,
            "current": self.progress.snapshot() if self.progress is not None and state == "running" else None,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        if error is not None:
            status.update(error_fields(error))
        old = self.found_status
        if old is not None and old.get("state") == "refused":
            old = old.get("previous")  # refused twice: what the directory holds is still the earlier state
        if state == "refused" and old is not None:
            # What the directory still holds (e.g. a finished run that a changed config cannot resume).
            status["previous"] = {k: old.get(k) for k in ("state", "stage", "stages_done", "updated", "error")}
        write_json_atomic(status, self.store.status_json)

    def _manifest(self, stages: list[Stage], history: list[StageRecord], planned: dict[int, int], seconds: float) -> dict:
        from curation.dataset_card import write_dataset_card
        from curation.manifest import RunFacts, build_manifest

        facts = RunFacts(
            store=self.store,
            fingerprint=self.fingerprint(),
            inputs=self.inputs(),
            seeds=self.seeds,
            excludes=self.excludes,
            stage_stats=self.stage_stats,
            warnings=self.warnings,
            config=self.cfg.model_dump(mode="json"),
            planned=planned,
        )
        manifest = build_manifest(facts, stages, seconds)
        write_json_atomic(manifest, self.store.manifest_json)
        write_dataset_card(self.store, manifest)
        return manifest


def run_pipeline(req: RunRequest) -> dict:
    """Library entry point behind ``curate run``."""
    runner = Runner(req)
    try:
        return runner.run()
    finally:
        if runner.progress is not None:
            runner.progress.close()
