"""The one contract every stage follows.

A stage declares the columns it reads, the columns it writes, the resources a worker needs and
the roles of rows it applies to. Two shapes exist:

* ``MapStage`` works row-batch by row-batch (decode, hashing, embeddings, NSFW, face blur). The
  runner runs it on a Ray Data actor pool; ``setup`` runs once per worker (load a model),
  ``process`` runs per batch and returns one output row per input row, with ``drop_reason``
  set (and ``drop_details`` as a JSON string) for rows it removes.
* ``GlobalStage`` relates rows across shards (deduplication, retrieval). It reads only the small
  columns it declares (never image bytes) of the rows of its ``roles`` (the executor filters;
  other rows pass through). It has a single-task form, ``run(table)``, which sees every such row
  at once and returns drops and, optionally, new columns for the rows it keeps; and, for inputs
  beyond one task's memory, a partitioned form, ``partitioned_steps()``: map / shuffle / reduce
  steps whose tasks each hold a bounded number of rows (``curation.partitioned.steps``). Both
  forms give the same drops wherever the partitioned computation is exact.

Stage configuration is a pydantic model (``StageConfig`` subclass) validated from the pipeline
YAML; a stage is found by its ``kind`` as module ``curation.stages.<kind>`` exposing ``STAGE``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, field_validator

from curation import schema


# A stage name becomes a directory of the run (stages/NN_<name>, ledger/NN_<name>) and a SQL view
# (stage_<name>), so it is one plain path component: a name such as '../x' would write outside the
# run, or over another stage's ledger.
STAGE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
# The runner's own steps, which write stages/00_ingest and the ledger rows of stage 'emit'.
RESERVED_STAGE_NAMES = ("ingest", "emit")


def check_stage_name(name: str) -> str:
    if not STAGE_NAME.fullmatch(name):
        raise ValueError(
            f"stage name {name!r} is not allowed: use 1 to 64 letters, digits, '_' or '-' (not first), "
            "since it names a directory in the run"
        )
    if name.lower() in RESERVED_STAGE_NAMES:
        raise ValueError(f"stage name {name!r} is reserved for the runner; choose another 'name'")
    return name


class StageConfig(BaseModel):
    """Common fields of every stage entry in a pipeline YAML."""

    model_config = ConfigDict(extra="forbid")

    kind: str
    name: str | None = None
    enabled: bool = True

    @field_validator("name")
    @classmethod
    def _contained_name(cls, name: str | None) -> str | None:
        return None if name is None else check_stage_name(name)

    @property
    def stage_name(self) -> str:
        return self.name or self.kind

    def model_needs(self) -> list:
        """Model files this stage loads (``curation.models.ModelNeed``): `curate models` lists,
        fetches and verifies them, and a run checks them all before any work."""
        return []


@dataclass(frozen=True)
class Resources:
    """What one worker of a stage needs from Ray."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    # Actor-pool size for map stages (min, max); ignored by global stages.
    concurrency: tuple[int, int] = (1, 1)
    # Rows handed to ``MapStage.process`` at once.
    batch_size: int = 64
    memory_bytes: int | None = None


@dataclass
class StageContext:
    """What a stage may know about the run it is part of."""

    run_dir: Path
    stage_dir: Path
    seed: int = 0
    # Seed datasets by name: {"imagenet1k": {"recipes": [...], "path": ...}}; filled by the runner.
    seeds: dict[str, Any] = field(default_factory=dict)
    # Resolved exclusion (evaluation) sets by name.
    excludes: dict[str, Any] = field(default_factory=dict)
    # Whether the run may proceed without model weights (NSFW etc.), reported loudly.
    allow_missing_weights: bool = False
    # Cluster CPUs/GPUs the runner sees, for stages that size work by them.
    cluster_cpus: int = 1
    cluster_gpus: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "stage_dir": str(self.stage_dir),
            "seed": self.seed,
            "seeds": self.seeds,
            "excludes": self.excludes,
            "allow_missing_weights": self.allow_missing_weights,
            "cluster_cpus": self.cluster_cpus,
            "cluster_gpus": self.cluster_gpus,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "StageContext":
        d = dict(d)
        d["run_dir"], d["stage_dir"] = Path(d["run_dir"]), Path(d["stage_dir"])
        return cls(**d)


class Stage:
    """Base of both stage shapes. Subclasses set ``kind``, ``Config`` and the column contract."""

    kind: ClassVar[str]
    Config: ClassVar[type[StageConfig]] = StageConfig
    # Rows whose role is not listed pass through untouched (their output columns are null).
    roles: ClassVar[tuple[str, ...]] = schema.ROLES

    def __init__(self, config: StageConfig, context: StageContext):
        self.config = config
        self.context = context

    @property
    def name(self) -> str:
        return self.config.stage_name

    # -- contract -------------------------------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        raise NotImplementedError

    def output_schema(self) -> pa.Schema:
        """Columns this stage adds (or replaces, e.g. ``bytes`` after face blurring)."""
        return pa.schema([])

    def resources(self) -> Resources:
        return Resources()

    def preflight(self) -> list[str]:
        """Checked on the driver before any work. Raise ``StageError`` to stop the run with a
        message that says how to fix it; return warnings that the manifest must report."""
        return []

    def manifest_section(self) -> dict[str, Any]:
        """Facts about this stage for the manifest (e.g. 'NSFW filtering NOT applied')."""
        return {}


class OptionalWeights:
    """For stages that load model weights (mixed into a ``Stage``): missing weights stop the run
    in ``preflight`` with ``missing_weights_help``; under ``--allow-missing-weights`` the stage
    runs NOT applied instead (output columns null, nothing dropped) and the manifest says so."""

    def weights_problem(self) -> str | None:
        """Why the weights cannot be loaded, or None. Cheap: it runs on the driver."""
        raise NotImplementedError

    def not_applied_what(self) -> str:
        return f"stage {self.name!r}"

    def missing_weights_help(self, problem: str) -> str:
        return f"stage {self.name!r}: {problem}"

    @property
    def may_skip(self) -> bool:
        """Whether missing weights let the run go on with this stage NOT applied."""
        return bool(self.context.allow_missing_weights)

    def not_applied_warning(self, problem: str) -> str:
        return f"{self.not_applied_what()} was NOT applied: {problem} (the run was started with --allow-missing-weights)"

    def weights_preflight(self) -> list[str]:
        problem = self.weights_problem()
        if problem is None:
            return []
        if self.may_skip:
            return [self.not_applied_warning(problem)]
        raise StageError(self.missing_weights_help(problem))

    def not_applied_section(self) -> dict[str, Any] | None:
        """The manifest section of a stage that runs NOT applied, else None."""
        problem = self.weights_problem()
        if problem is not None and self.may_skip:
            return {"applied": False, "warning": self.not_applied_warning(problem)}
        return None


class MapStage(Stage):
    def setup(self) -> None:
        """Once per worker, before the first batch: load models, build transforms."""

    def process(self, batch: pa.Table) -> pa.Table:
        """Return one row per input row with the ``output_schema`` columns and optionally
        ``drop_reason`` / ``drop_details``. A stage that replaces an existing column (such as
        ``bytes``) returns null for rows it leaves unchanged, so the store keeps one copy."""
        raise NotImplementedError


@dataclass
class GlobalResult:
    """Outcome of a global stage.

    drops: table with ``uid``, ``drop_reason``, ``drop_details`` for removed rows.
    annotations: table with ``uid`` plus ``output_schema`` columns for kept rows (may be None).
    summary: free-form facts for the manifest and summary table.
    """

    drops: pa.Table
    annotations: pa.Table | None = None
    summary: dict[str, Any] = field(default_factory=dict)


class GlobalStage(Stage):
    def run(self, table: pa.Table) -> GlobalResult:
        """``table`` holds ``uid``, ``role`` and the declared input columns of every row still
        alive whose role is in ``roles``, sorted by uid."""
        raise NotImplementedError

    def partitioned_steps(self) -> list | None:
        """The partitioned form (a list of ``curation.partitioned.steps`` steps ending in a
        ``drops`` dataset), or None when the stage has only the single-task form. Must be cheap
        and deterministic: the driver and every worker build it from the configuration."""
        return None

    def partitioned_summary(self, counters: dict[str, dict], facts: dict[str, dict]) -> dict:
        """The stage summary of a partitioned run from its steps' summed counters and its
        aggregates' facts."""
        return {"steps": counters, "facts": facts}


class StageError(RuntimeError):
    """A configuration or environment problem that stops a run before work starts."""


# Appended to every missing-weights refusal: the pipeline that needs none.
WEIGHT_FREE_HINT = (
    "To run with no downloaded weights at all, use the weight-free pipeline: --config offline "
    "(perceptual hashes, local-feature copy detection, face blurring; NSFW filtering reported as NOT applied)."
)


DROPS_SCHEMA = pa.schema(
    [
        pa.field(schema.UID, pa.int64(), nullable=False),
        pa.field(schema.DROP_REASON, pa.string(), nullable=False),
        pa.field(schema.DROP_DETAILS, pa.string()),
    ]
)


def make_drops(uids, reasons, details) -> pa.Table:
    """Build a drops table; ``details`` items may be dicts (serialised to JSON) or None."""
    return pa.table(
        {
            schema.UID: pa.array(list(uids), pa.int64()),
            schema.DROP_REASON: pa.array(list(reasons), pa.string()),
            schema.DROP_DETAILS: pa.array(
                [None if d is None else (d if isinstance(d, str) else json.dumps(d, sort_keys=True)) for d in details],
                pa.string(),
            ),
        },
        schema=DROPS_SCHEMA,
    )


def empty_drops() -> pa.Table:
    return DROPS_SCHEMA.empty_table()


def check_column_order(stages: list["Stage"], ingested: list[str]) -> None:
    """Refuse a pipeline where a stage reads a column no earlier stage writes (e.g. a hash band
    listed before the ``local_features`` it verifies with): the run would fail only when it got
    there, after the stages before it had run."""
    have = {schema.UID, *ingested}
    writers: dict[str, str] = {}
    for stage in stages:
        for column in stage.output_schema().names:
            writers.setdefault(column, stage.name)
    for stage in stages:
        missing = [c for c in stage.input_columns() if c not in have]
        if missing:
            later = writers.get(missing[0])
            fix = (f"stage {later!r} writes it but runs later: list it before {stage.name!r}" if later
                   else "no stage of this pipeline writes it: add the stage that does")
            raise StageError(f"stage {stage.name!r} reads column {missing[0]!r}, which no earlier stage writes ({fix})")
        have.update(stage.output_schema().names)


# -- registry ------------------------------------------------------------------------------
def available_kinds() -> list[str]:
    import curation.stages as pkg

    return sorted(m.name for m in pkgutil.iter_modules(pkg.__path__) if not m.name.startswith("_"))


def stage_class(kind: str) -> type[Stage]:
    if kind not in available_kinds():
        raise StageError(f"unknown stage kind {kind!r}; known kinds: {', '.join(available_kinds())}")
    module = importlib.import_module(f"curation.stages.{kind}")
    cls = getattr(module, "STAGE", None)
    if cls is None:
        raise StageError(f"module curation.stages.{kind} defines no STAGE")
    return cls
