"""`curate run --dry-run` writes nothing and says what a run would do; a refused resume names the
configuration keys that changed."""

from __future__ import annotations

import pytest

from curation.cli import EXIT_OK, EXIT_REFUSED, main
from curation.config import load_config
from curation.config_diff import changed_keys
from curation.dry_run import dry_run
from curation.runner import RunError, RunRequest, Runner
from tests.conftest import make_jpeg


@pytest.fixture
def pool(tmp_path):
    d = tmp_path / "pool"
    d.mkdir()
    for i in range(12):
        (d / f"{i}.jpg").write_bytes(make_jpeg(i))
    return d


def snapshot(root):
    return sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")) if root.exists() else None


def test_dry_run_plans_checks_and_lists_stages_without_writing(pool, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--pool", str(pool), "--config", "demo", "--out", str(out), "--set", "ingest.shard_size=5",
                 "--allow-missing-weights", "--dry-run"])
    text = capsys.readouterr().out
    assert code == EXIT_OK and not out.exists()
    assert "NEW, a new run" in text and "plan: 12 input items in 3 shard(s) of at most 5" in text
    assert "nsfw" in text and "MISSING" in text  # the weights check, NOT applied under --allow-missing-weights
    assert "local_copy_dedup     global, single task (at most 12 input rows <= execution.single_task_max_rows 500,000)" in text
    assert "retrieve             global, single task (at most 12 input rows <= execution.single_task_max_rows 500,000)" in text
    assert "emit: parquet, shards of 10,000 rows" in text
    assert "resolved configuration:" in text and "shard_size: 5" in text


def test_dry_run_refuses_missing_weights_with_exit_code_2(pool, tmp_path, capsys):
    code = main(["run", "--pool", str(pool), "--config", "demo", "--out", str(tmp_path / "run"), "--dry-run"])
    assert code == EXIT_REFUSED and "curate models fetch" in capsys.readouterr().out


def test_partitioned_form_is_named_when_the_pool_exceeds_the_single_task_limit(pool, tmp_path):
    cfg = load_config("smoke", sets=["execution.single_task_max_rows=10"])
    report = dry_run(RunRequest(pools=[str(pool)], out=tmp_path / "run", config=cfg))
    dedup = next(s for s in report["stages"] if s["name"] == "exact_dedup")
    assert (dedup["shape"], dedup["form"]) == ("global", "partitioned")
    assert report["plan"]["items"] == 12 and report["weights"]["ok"]


def test_an_existing_run_is_resumed_or_refused_and_left_untouched(pool, tmp_path):
    out = tmp_path / "run"
    cfg = load_config("smoke")
    Runner(RunRequest(pools=[str(pool)], out=out, config=cfg))._check_resume()  # what a first run writes before work
    before = snapshot(out)
    same = dry_run(RunRequest(pools=[str(pool)], out=out, config=cfg))
    assert same["state"] == "resume"
    changed = load_config("smoke", sets=["stages.decode.min_side=100", "emit.shard_rows=50"])
    other = dry_run(RunRequest(pools=[str(pool)], out=out, config=changed))
    assert other["state"] == "refused"
    assert "stages.decode.min_side: 32 -> 100" in other["detail"] and "emit.shard_rows: 10000 -> 50" in other["detail"]
    assert snapshot(out) == before
    with pytest.raises(RunError, match=r"changed: emit.shard_rows: 10000 -> 50; stages.decode.min_side: 32 -> 100"):
        Runner(RunRequest(pools=[str(pool)], out=out, config=changed))._check_resume()


def test_changed_keys_address_stages_by_name_and_ignore_what_the_fingerprint_ignores():
    old = {"seed": 0, "stages": [{"kind": "decode", "min_side": 32}, {"kind": "embed", "name": "sscd", "dim": 512}],
           "ray": {"num_cpus": 2}, "execution": {"stage_retries": 2, "max_partition_rows": 10}}
    new = {"seed": 1, "stages": [{"kind": "decode", "min_side": 32}, {"kind": "phash"}],
           "ray": {"num_cpus": 8}, "execution": {"stage_retries": 0, "max_partition_rows": 20}}
    assert changed_keys(old, new) == [
        "execution.max_partition_rows: 10 -> 20", "seed: 0 -> 1", "stages.sscd: removed", "stages.phash: added",
    ]


def test_a_busy_directory_and_changed_inputs_are_reported_not_hidden(pool, tmp_path, capsys):
    from curation.planning import load_or_make_plan, source_specs
    from curation.runlock import RunLock
    from curation.store import RunStore

    out = tmp_path / "run"
    cfg = load_config("smoke")
    Runner(RunRequest(pools=[str(pool)], out=out, config=cfg))._check_resume()
    load_or_make_plan(RunStore(out), source_specs([str(pool)], [], []), cfg.ingest)  # the plan a started run made
    args = ["run", "--pool", str(pool), "--config", "smoke", "--out", str(out), "--dry-run"]
    with RunLock(out, command="curate run (another one)"):
        code = main(args)
        text = capsys.readouterr().out
    assert code == EXIT_REFUSED and "REFUSED, busy:" in text and "another one" in text

    (pool / "new.jpg").write_bytes(make_jpeg(99))  # an input appears after the plan was made
    before = snapshot(out)
    assert main(args) == EXIT_REFUSED
    text = capsys.readouterr().out
    assert "REFUSED, the inputs changed since the plan:" in text and "new.jpg" in text and "--replan" in text
    assert main([*args, "--replan"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "REPLAN, plans again and runs every stage" in text and "plan: 13 input items" in text
    assert snapshot(out) == before  # a dry run writes nothing, whatever it finds
