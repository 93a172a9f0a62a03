"""The run directory tells the truth about its run: status.json says how the last attempt ended
(finished, failed in a stage, refused by a check), a rerun notices inputs that changed since the
plan was made (and ``--replan`` starts over from them), and the manifest accounts for every
planned input item, not only for the ledger's own rows."""

from __future__ import annotations

import json
import shutil

import pytest

from curation.cli import build_parser, main
from curation.config import load_config
from curation.ingest.errors import IngestError
from curation.manifest import AccountingError, check_against_plan
from curation.planning import load_or_make_plan, source_specs
from curation.runner import RunError, RunRequest, run_pipeline
from curation.store import RunStore, write_json_atomic
from tests.conftest import make_jpeg
from tests.helpers import dataset_rows, ledger_rows, manifest

SMALL = {"ingest": {"shard_size": 6}}


def make_pool(path, n=20):
    path.mkdir(parents=True)
    for i in range(n):
        (path / f"img_{i:03d}.jpg").write_bytes(make_jpeg(i))
    (path / "copy.jpg").write_bytes((path / "img_000.jpg").read_bytes())  # an exact duplicate
    (path / "zero.jpg").write_bytes(b"")  # dropped at ingest
    return path


def run(pool, out, config=None, **kw):
    return run_pipeline(RunRequest(pools=[str(pool)], out=out, config=config or load_config("smoke", overrides=SMALL), progress=False, **kw))


def status(out) -> dict:
    return json.loads((out / "status.json").read_text())


def status_text(out, capsys) -> str:
    capsys.readouterr()
    assert main(["status", "--run", str(out)]) == 0
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def finished(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("finished")
    pool = make_pool(root / "pool")
    run(pool, root / "run")
    return pool, root / "run"


@pytest.fixture
def finished_copy(finished, tmp_path):
    """A private copy of the finished run, for tests that change it."""
    pool, out = finished
    shutil.copytree(out, tmp_path / "run")
    return pool, tmp_path / "run"


def test_a_run_that_fails_records_failed_with_its_stage_and_error(tmp_path, ray_local, capsys):
    pool, out = make_pool(tmp_path / "pool"), tmp_path / "run"
    (out / "stages" / "01_decode" / "part-00000.parquet").mkdir(parents=True)  # decode cannot write shard 0
    with pytest.raises(Exception, match="IsADirectoryError"):
        run(pool, out)
    s = status(out)
    assert s["state"] == "failed" and s["stage"] == "decode"
    assert "IsADirectoryError" in s["error"] and s["stages_done"] == ["ingest"]
    text = status_text(out, capsys)
    assert "state: failed" in text and "in stage decode" in text and "IsADirectoryError" in text


def test_an_empty_pool_is_refused_and_says_so(tmp_path, ray_local, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(IngestError, match="holds no input items"):
        run(tmp_path / "empty", tmp_path / "run")
    s = status(tmp_path / "run")
    assert s["state"] == "refused" and "holds no input items" in s["error"]
    assert "state: refused" in status_text(tmp_path / "run", capsys)


def test_a_run_directory_inside_its_pool_is_refused(tmp_path):
    pool = make_pool(tmp_path / "pool", n=2)
    with pytest.raises(RunError, match="is inside the input folder"):
        run(pool, pool / "run")
    assert status(pool / "run")["state"] == "refused"


def test_a_changed_configuration_is_refused_and_the_finished_run_is_still_described(finished_copy, capsys):
    pool, out = finished_copy
    changed = load_config("smoke", overrides={**SMALL, "stages": [{"kind": "decode", "min_side": 100}]})
    with pytest.raises(RunError, match="different configuration"):
        run(pool, out, changed)
    s = status(out)
    assert s["state"] == "refused" and "different configuration" in s["error"]
    assert s["previous"]["state"] == "finished"
    text = status_text(out, capsys)
    assert "state: refused" in text and "previous attempt: finished" in text


def test_changed_inputs_are_refused_naming_the_change_and_replan_starts_over(tmp_path, ray_local):
    pool, out = make_pool(tmp_path / "pool"), tmp_path / "run"
    run(pool, out)
    (pool / "img_new.jpg").write_bytes(make_jpeg(1000))
    (pool / "img_001.jpg").unlink()
    with pytest.raises(RunError, match=r"1 new \(.*img_new\.jpg\), 1 removed \(.*img_001\.jpg\).*--replan"):
        run(pool, out)
    assert status(out)["state"] == "refused" and "img_new.jpg" in status(out)["error"]
    run(pool, out, replan=True)
    fresh = tmp_path / "fresh"
    run(pool, fresh)
    assert dataset_rows(out) == dataset_rows(fresh)
    assert ledger_rows(out) == ledger_rows(fresh)  # nothing of the old plan is left over
    assert manifest(out)["counts"]["input"] == 22
    run(pool, out, replan=True)  # inputs as planned now: --replan only resumes (a no-op here)
    assert ledger_rows(out) == ledger_rows(fresh)


def test_a_replan_that_was_interrupted_is_finished_by_the_next_run(tmp_path):
    pool = make_pool(tmp_path / "pool", n=4)
    store = RunStore(tmp_path / "run")
    specs = source_specs([str(pool)], [], [])
    cfg = load_config("smoke", overrides=SMALL).ingest
    load_or_make_plan(store, specs, cfg)
    (pool / "img_new.jpg").write_bytes(make_jpeg(7))
    # Killed after it marked the replan and removed part of the old outputs (the plan still old).
    write_json_atomic({"reason": "inputs changed"}, store.replan_json)
    (store.run_dir / "stages" / "00_ingest").mkdir(parents=True)
    (store.run_dir / "stages" / "00_ingest" / "_SUCCESS").write_text("{}")
    plan = load_or_make_plan(store, specs, cfg)  # without --replan: the marker says finish it
    assert not (store.run_dir / "stages").exists() and not store.replan_json.exists()
    assert sum(len(u.items) for u in plan.units()) == plan.num_items == 7
    assert list(load_or_make_plan(store, specs, cfg).units()) == list(plan.units())


def test_the_manifest_accounts_for_every_planned_item(finished_copy):
    pool, out = finished_copy
    lost = sorted((out / "ledger" / "00_ingest").glob("part-*.parquet"))[-1]  # the shard with zero.jpg
    lost.unlink()  # the ledger still balances against itself: input = kept + dropped
    with pytest.raises(AccountingError, match=r"no ledger row for 1 planned item \(shard 3 row 3\)"):
        run(pool, out)
    s = status(out)
    assert s["state"] == "failed" and s["stage"] == "manifest" and "no ledger row" in s["error"]


def test_the_plan_check_names_missing_unplanned_and_repeated_items():
    planned = {0: 3, 1: 2}
    uid = lambda shard, row: shard << 20 | row  # noqa: E731
    check_against_plan([uid(0, 0), uid(0, 1), uid(0, 2), uid(1, 0), uid(1, 1)], planned)
    with pytest.raises(AccountingError, match=r"no ledger row for 1 planned item \(shard 1 row 1\)"):
        check_against_plan([uid(0, 0), uid(0, 1), uid(0, 2), uid(1, 0)], planned)
    with pytest.raises(AccountingError, match=r"2 ledger rows not in the plan \(shard 0 row 3, shard 5 row 0\)"):
        check_against_plan([uid(0, 0), uid(0, 1), uid(0, 2), uid(0, 3), uid(1, 0), uid(1, 1), uid(5, 0)], planned)
    with pytest.raises(AccountingError, match=r"1 item recorded more than once \(shard 0 row 2\)"):
        check_against_plan([uid(0, 0), uid(0, 1), uid(0, 2), uid(0, 2), uid(1, 0), uid(1, 1)], planned)


def test_replan_is_a_run_option():
    args = build_parser().parse_args(["run", "--pool", "p", "--replan"])
    assert args.replan is True
    assert build_parser().parse_args(["run", "--pool", "p"]).replan is False
