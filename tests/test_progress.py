"""The run's progress: lines at a bounded interval without a terminal, a live display in one,
throttled status updates, global stages by step; and the executor's rerun of a stage's
unfinished shards when Ray lost a worker."""

from __future__ import annotations

import io
import json
import time

import pytest

from curation.cli import main
from curation.config import ExecutionConfig
from curation.executor import RayExecutor, is_system_failure
from curation.progress import RunProgress, describe_snapshot, resolve_mode
from curation.store import MAP, RunStore, StageRecord

STAGES = ["ingest", "decode", "copy_dedup", "emit"]


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_auto_is_live_on_a_terminal_and_lines_elsewhere():
    assert resolve_mode("auto", Tty()) == "live"
    assert resolve_mode("auto", io.StringIO()) == "lines"
    assert resolve_mode(False, Tty()) == "off" and resolve_mode(True, io.StringIO()) == "lines"
    with pytest.raises(ValueError, match="progress mode"):
        resolve_mode("bars", io.StringIO())


def test_lines_at_the_interval_while_a_stage_runs_and_at_its_end():
    out = io.StringIO()
    p = RunProgress(STAGES, "lines", interval=0.1, stream=out)
    p.stage_started("decode", total=1000, shards=10)
    p.advance("decode", 100, shards=1)
    time.sleep(0.35)  # no shard finishes meanwhile: the timer still reports
    p.stage_finished("decode", {"in": 1000, "out": 990, "dropped": {"corrupt": 10}, "wall_seconds": 4.0})
    p.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == "curate: decode: started, 1,000 images in 10 shard(s) (stage 2/4)"
    running = [line for line in lines[1:-1] if "100/1,000 images" in line]
    assert len(running) >= 2 and all(" images/s, ETA " in line and "(stage 2/4)" in line for line in running)
    assert lines[-1] == "curate: decode: done, 1,000 in, 990 out, 10 dropped in 0:00:04 (stage 2/4)"


def test_global_stages_report_their_steps_and_task_counts():
    out = io.StringIO()
    p = RunProgress(STAGES, "lines", interval=0.05, stream=out)
    p.stage_started("copy_dedup", None, "tasks", shards=10)
    p.steps("copy_dedup", ["_count", "sample", "knn", "components", "_finalize"])
    p.step("copy_dedup", "knn", total=8, done=2)
    p.advance("copy_dedup", 3)
    snap = p.snapshot()
    assert (snap["step"], snap["step_index"], snap["steps"], snap["done"], snap["total"], snap["unit"]) == ("knn", 3, 5, 5, 8, "tasks")
    p.step("copy_dedup", "components.r1.large", total=4)
    assert p.snapshot()["step_index"] == 4  # rounds of a components step count as that step
    time.sleep(0.2)
    p.close()
    assert "copy_dedup: step 4/5 components.r1.large: 0/4 tasks" in out.getvalue()
    assert describe_snapshot(snap).startswith("copy_dedup: step 3/5 knn: 5/8 tasks (62.5%)")


def test_the_live_display_draws_a_bar_per_stage_under_the_run():
    out = Tty()
    p = RunProgress(STAGES, "live", stream=out)
    p.stage_started("ingest", total=200, shards=2)
    p.advance("ingest", 100, shards=1)
    p.stage_finished("ingest", {"in": 200, "out": 198, "dropped": {"not_image": 2}})
    p.note("Ray dashboard: http://127.0.0.1:8265")
    p.close()
    screen = out.getvalue()
    assert "run" in screen and "ingest" in screen and "198 kept, 2 dropped" in screen and "127.0.0.1:8265" in screen


def test_status_updates_are_throttled_but_every_stage_start_is_written():
    seen: list[dict] = []
    p = RunProgress(STAGES, "off", status_interval=60, on_status=seen.append)
    p.stage_started("decode", total=100)
    for _ in range(50):
        p.advance("decode", 1, shards=1)
    assert len(seen) == 1 and seen[0]["done"] == 0
    fast = RunProgress(STAGES, "off", status_interval=0, on_status=seen.append)
    fast.stage_started("decode", total=100)
    fast.advance("decode", 10, shards=1)
    assert seen[-1]["done"] == 10 and seen[-1]["shards_done"] == 1


def test_curate_status_shows_where_a_running_stage_is(tmp_path, capsys):
    current = {"stage": "decode", "unit": "images", "done": 250, "total": 1000, "shards": 10, "shards_done": 2,
               "rate_per_second": 50.0, "eta_seconds": 15.0}
    (tmp_path / "status.json").write_text(json.dumps({"state": "running", "updated": "now", "stats": [], "current": current}))
    assert main(["status", "--run", str(tmp_path)]) == 0
    assert "now: decode: 250/1,000 images (25.0%), 50.0 images/s, ETA 0:00:15, shards 2/10" in capsys.readouterr().out


class ActorDiedError(Exception):
    """Named as Ray names it: the executor recognises lost workers by class name."""


def test_a_stage_reruns_only_its_unfinished_shards_after_ray_lost_a_worker(tmp_path):
    store = RunStore(tmp_path)
    rec = StageRecord(1, "decode", "decode", MAP, [])
    ex = RayExecutor(store, ExecutionConfig(stage_retries=1))
    calls: list[list[int]] = []

    def fake_map(rec_, pending, row_for, fn, options):
        calls.append(list(pending))
        store.mark_shard_done(rec_, pending[0], {"in": 5, "out": 5, "dropped": {}, "seconds": 0.1})
        if len(calls) == 1:
            raise RuntimeError("dataset failed") from ActorDiedError("the actor died unexpectedly")
        for s in pending[1:]:
            store.mark_shard_done(rec_, s, {"in": 5, "out": 5, "dropped": {}, "seconds": 0.1})

    ex._map_pending = fake_map
    stats = ex.run_shards(rec, [0, 1, 2], None, None, None, total=15)
    assert calls == [[0, 1, 2], [1, 2]] and stats["in"] == 15 and store.stage_done(rec)


def test_errors_of_our_code_are_not_retried(tmp_path):
    store = RunStore(tmp_path)
    ex = RayExecutor(store, ExecutionConfig(stage_retries=3))
    calls = []

    def failing(*args):
        calls.append(1)
        raise ValueError("a bug")

    ex._map_pending = failing
    with pytest.raises(ValueError):
        ex.run_shards(StageRecord(1, "decode", "decode", MAP, []), [0], None, None, None)
    assert calls == [1]
    assert is_system_failure(RuntimeError("x")) is False


def test_ray_tasks_are_named_after_their_stage_and_step(ray_local, tmp_path):
    import ray

    def task(item: dict) -> dict:
        return {"y": item["x"] * 10, "name": ray.get_runtime_context().get_task_name()}

    seen = []
    progress = RunProgress(STAGES, "off", on_status=seen.append, status_interval=0)
    ex = RayExecutor(RunStore(tmp_path), progress=progress)
    progress.stage_started("copy_dedup", None, "tasks")
    progress.step("copy_dedup", "knn", total=5)
    out = ex.run_tasks("copy_dedup:knn", [{"x": x} for x in range(5)], task)  # more items than in flight at once
    assert out == [{"y": 10 * x, "name": "copy_dedup.knn"} for x in range(5)]  # in item order
    assert seen[-1]["done"] == 5


def test_a_task_that_raises_fails_run_tasks_with_its_error(ray_local, tmp_path):
    def task(item: dict) -> dict:
        if item["x"] == 3:
            raise ValueError("bad item 3")
        return {}

    with pytest.raises(ValueError, match="bad item 3"):
        RayExecutor(RunStore(tmp_path)).run_tasks("copy_dedup:knn", [{"x": x} for x in range(6)], task)


def test_the_dashboard_url_is_made_a_link():
    from curation.executor import _dashboard

    assert _dashboard(type("Ctx", (), {"dashboard_url": "127.0.0.1:8265"})()) == "http://127.0.0.1:8265"
    assert _dashboard(type("Ctx", (), {"dashboard_url": ""})()) is None
