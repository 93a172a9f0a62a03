"""Map stages without a GPU run as Ray Data tasks: a worker process sets its stage up once and
reuses it for every later shard of that stage, and holds at most one stage at a time."""

from __future__ import annotations

import numpy as np

from curation import shard_ops


class CountingWorker:
    made: list[tuple[dict, str]] = []

    def __init__(self, spec: dict, run_dir: str):
        self.spec = spec
        CountingWorker.made.append((spec, run_dir))

    def __call__(self, batch: dict) -> dict:
        return {"shard": np.asarray(batch["shard"]), "stats": np.asarray(["{}"] * len(batch["shard"]))}


def test_a_stage_is_set_up_once_per_process_and_replaced_by_the_next(monkeypatch):
    monkeypatch.setattr(shard_ops, "MapShardWorker", CountingWorker)
    monkeypatch.setattr(shard_ops, "_worker", None)
    CountingWorker.made = []
    decode, phash = {"name": "decode", "config": {"min_side": 32}}, {"name": "phash", "config": {}}
    for shard in range(3):
        out = shard_ops.map_shards_task({"shard": [shard]}, decode, "/runs/a")
        assert out["shard"].tolist() == [shard]
    assert CountingWorker.made == [(decode, "/runs/a")]
    shard_ops.map_shards_task({"shard": [0]}, phash, "/runs/a")
    shard_ops.map_shards_task({"shard": [1]}, phash, "/runs/a")
    assert CountingWorker.made == [(decode, "/runs/a"), (phash, "/runs/a")]
    assert shard_ops._worker[1].spec == phash  # the decode stage is no longer held
    shard_ops.map_shards_task({"shard": [0]}, phash, "/runs/b")  # another run: set up again
    assert len(CountingWorker.made) == 3
