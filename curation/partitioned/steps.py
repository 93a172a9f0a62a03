"""The partitioned form of a global stage: a chain of map, shuffle and reduce steps.

A stage that can run beyond one task's memory returns its steps from
``GlobalStage.partitioned_steps()``. Each step is pure: it reads its inputs, returns tables, and
the engine (``curation.partitioned.engine``) writes them as partition files, marks the task done
and schedules the next step, so any task can be retried or resumed on its own.

* ``MapStep``: one task per group of input shards (at most ``map_task_rows`` rows). It sees the
  stage's input columns for the rows of its roles and returns ``{dataset: table}``, each table
  carrying a ``_partition`` column (the shuffle key, already hashed). ``side_input`` names a
  dataset (or a tuple of them) keyed by group whose partition for this group is handed over as
  well (a join).
* ``ReduceStep``: one task per non-empty partition of ``input``; it streams the partition in
  chunks and returns ``{dataset: table}`` keyed for the next step. ``side_input`` names a
  dataset partitioned the same way whose partition of the same number comes along.
* ``CrossStep``: one task per pair of non-empty partitions of ``left`` and ``right`` (an index
  shard against a batch of queries): each side bounded, so neither side is ever held whole.
* ``AggregateStep``: one task over small datasets (a sample, per-task partial sums) that returns
  an artifact (numpy arrays and JSON values) every later task can read.
* ``ComponentsStep``: connected components of an edge dataset, distributed
  (``curation.partitioned.components``); it writes ``(uid, label)`` keyed by group.

The last step of every stage writes the dataset ``drops`` keyed by group (and, for a stage with
output columns, ``annotations`` keyed by group, from the same step); the engine turns them into
the same per-shard drops, ledger and annotation files as the single-task form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from curation import schema
from curation.partitioned.keys import partition_of

DROPS = "drops"
ANNOTATIONS = "annotations"


@dataclass
class Output:
    """A dataset a step writes, and how many partitions it has (fixed when the step starts)."""

    name: str
    partitions: Callable[["PlanState"], int] | int

    def count(self, state: "PlanState") -> int:
        n = self.partitions(state) if callable(self.partitions) else self.partitions
        return max(1, int(n))


@dataclass
class MapStep:
    name: str
    fn: Callable[[pa.Table, "TaskContext"], dict[str, pa.Table]]
    outputs: list[Output]
    columns: tuple[str, ...] | None = None  # default: the stage's input columns
    side_input: str | tuple[str, ...] | None = None  # "step/dataset" keyed by group, or several


@dataclass
class CrossStep:
    name: str
    left: str  # "step/dataset"
    right: str  # "step/dataset"
    fn: Callable[["PartitionInput", "PartitionInput", "TaskContext"], dict[str, pa.Table]]
    outputs: list[Output]


@dataclass
class ReduceStep:
    name: str
    input: str  # "step/dataset"
    fn: Callable[["PartitionInput", "TaskContext"], dict[str, pa.Table]]
    outputs: list[Output]
    whole: bool = False  # one task over every partition (fn gets a list of PartitionInput)
    side_input: str | None = None  # "step/dataset" whose same-numbered partition comes along (ctx.side)


@dataclass
class AggregateStep:
    name: str
    inputs: list[str]  # "step/dataset" each
    fn: Callable[[dict[str, "PartitionInput"], "TaskContext"], "Artifact"]


@dataclass
class ComponentsStep:
    name: str
    input: str  # "step/dataset" of (node, nbr) rows in both directions
    output: str = "labels"


Step = MapStep | ReduceStep | CrossStep | AggregateStep | ComponentsStep


@dataclass
class Artifact:
    """What an aggregate step hands to later steps: arrays plus JSON-able facts."""

    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class PlanState:
    """Facts the engine knows when it sizes a step's outputs (persisted, so a resume agrees)."""

    n_rows: int  # rows the stage applies to (its roles), counted before the first step
    n_groups: int
    max_partition_rows: int
    dataset_rows: dict[str, int]  # rows of every finished dataset, "step/dataset" -> rows
    facts: dict[str, dict]  # artifact facts by aggregate step name

    def partitions_for(self, rows: float) -> int:
        """Partitions so that each holds about ``max_partition_rows`` rows."""
        return max(1, int(np.ceil(rows / self.max_partition_rows)))


class PartitionInput:
    """One partition of a dataset, as a reduce or aggregate task sees it."""

    def __init__(self, dataset, partition: int):
        self.dataset = dataset
        self.partition = partition

    @property
    def rows(self) -> int:
        return 0 if self.dataset is None else self.dataset.partition_rows(self.partition)

    def chunks(self, columns: list[str] | None = None):
        if self.dataset is None:
            return iter(())
        return self.dataset.chunks(self.partition, columns)

    def read(self, columns: list[str] | None = None) -> pa.Table | None:
        parts = list(self.chunks(columns))
        return pa.concat_tables(parts) if parts else None


@dataclass
class TaskContext:
    """What a step function may know about its task and the stage."""

    stage: Any  # the GlobalStage
    seed: int
    state: PlanState
    partitions: dict[str, int]  # output dataset name -> partitions of the running step
    group_of_shard: dict[int, int]
    task: int  # group index (map) or partition (reduce)
    artifacts: Callable[[str], Artifact]
    counters: dict[str, float] = field(default_factory=dict)
    side: "PartitionInput | None" = None  # a map step's side input for its group
    sides: dict[str, "PartitionInput"] = field(default_factory=dict)  # every side input, by "step/dataset"
    input_partitions: int = 0  # a reduce step's input dataset: how many partitions it has

    def count(self, key: str, value: float = 1) -> None:
        """Add to a summary counter; the engine sums counters over the tasks of a step."""
        self.counters[key] = self.counters.get(key, 0) + value

    def peak(self, key: str, value: float) -> None:
        """Keep the largest value of a summary figure (suffix ``_max`` when summed over tasks)."""
        k = f"{key}_max"
        self.counters[k] = max(self.counters.get(k, value), value)

    def groups_of_uids(self, uids) -> np.ndarray:
        """Group index of each uid (the partition of datasets keyed by group)."""
        shards = np.asarray(uids, np.int64) >> schema.UID_SHARD_BITS
        keys = np.fromiter(self.group_of_shard.keys(), np.int64, len(self.group_of_shard))
        vals = np.fromiter(self.group_of_shard.values(), np.int64, len(self.group_of_shard))
        order = np.argsort(keys)
        pos = np.searchsorted(keys[order], shards)
        return vals[order][pos]

    def hash_partitions(self, keys, dataset: str, salt: int = 0) -> np.ndarray:
        return partition_of(keys, self.partitions[dataset], salt)
