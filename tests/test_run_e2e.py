"""`curate run` end to end through a local Ray on real images: every input ends in exactly one
place, duplicates and broken files carry reasons, the manifest is consistent."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.runner import RunError, RunRequest, run_pipeline
from tests.helpers import copy_images, dataset_rows, ledger_rows, manifest, stage_values


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("inputs")
    pool = root / "pool"
    shutil.copytree(shared_data / "imagededup_fixtures", pool / "fixtures")
    copy_images(shared_data / "pool_caltech101", pool / "caltech", per_class=6, classes=["accordion", "pizza", "umbrella", "BACKGROUND_Google"])
    good = (pool / "caltech" / "pizza").iterdir().__next__().read_bytes()
    (pool / "broken").mkdir()
    (pool / "broken" / "zero.jpg").write_bytes(b"")
    (pool / "broken" / "half.jpg").write_bytes(good[: len(good) // 2])
    (pool / "broken" / "copy_of_pizza.jpg").write_bytes(good)
    seeds = root / "seeds"
    seeds.mkdir()
    for f in sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[:12]:
        (seeds / f.name.split("_")[0]).mkdir(exist_ok=True)
        shutil.copyfile(f, seeds / f.name.split("_")[0] / f.name)
    return pool, seeds


@pytest.fixture(scope="module")
def run_dir(inputs, tmp_path_factory, ray_local):
    pool, seeds = inputs
    out = tmp_path_factory.mktemp("run") / "out"
    run_pipeline(RunRequest(pools=[str(pool)], seeds=[str(seeds)], out=out, config=load_config("smoke")))
    return out


def test_every_input_ends_in_exactly_one_place(run_dir, inputs):
    pool, seeds = inputs
    m = manifest(run_dir)
    c = m["counts"]
    n_files = sum(1 for p in pool.rglob("*") if p.is_file()) + sum(1 for p in seeds.rglob("*") if p.is_file())
    assert c["input"] == n_files
    assert c["input"] == c["kept"] + sum(c["dropped"].values())
    assert c["ledger_duplicate_uids"] == 0
    ledger = ledger_rows(run_dir)
    assert len(ledger) == n_files and len({r[0] for r in ledger}) == n_files
    assert sum(s["rows"] for s in m["shards"]) == c["kept"] == len(dataset_rows(run_dir))


def test_broken_inputs_have_reasons(run_dir):
    by_file = {}
    for p in (run_dir / "ledger").rglob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            by_file.setdefault(r["source_key"].rsplit("/", 1)[-1], []).append(r)
    assert by_file["zero.jpg"][0]["reason"] == "zero_bytes"
    assert by_file["half.jpg"][0]["reason"] == "truncated"
    assert {r["reason"] for r in by_file["ukbench09268_corrupt.jpg"]} <= {"corrupt", "not_image"}
    assert by_file["ground_truth.pkl"][0]["reason"] == "not_image"


def test_exact_duplicates_point_at_their_kept_copy(run_dir):
    kept = {uid: key for uid, _id, key in dataset_rows(run_dir)}
    dups = [r for p in (run_dir / "ledger").rglob("*.parquet") for r in pq.read_table(p).to_pylist() if r["reason"] == "exact_duplicate"]
    assert len(dups) >= 12  # 11 among the fixtures + the planted pizza copy
    for r in dups:
        d = json.loads(r["details"])
        assert d["kept_uid"] in kept and kept[d["kept_uid"]] == d["kept_source_key"]
        assert d["kept_id"] == r["id"]
    ids = [i for _u, i, _k in dataset_rows(run_dir)]
    assert len(ids) == len(set(ids))


def test_dataset_rows_are_lvd_style(run_dir):
    m = manifest(run_dir)
    for s in m["shards"]:
        path = run_dir / s["path"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == s["sha256"]
    t = pq.read_table(run_dir / m["shards"][0]["path"])
    # The column contract (curation.contract): stable columns only, internal ones stay in stages/.
    assert t.column_names == [c["name"] for c in m["dataset"]["columns"]] == m["columns"]
    for col in ("key", "image", "id", "sha256", "width", "height", "original_width", "original_height", "source", "source_key",
                "url", "label", "method", "seed_dataset", "seed_ids", "similarity", "cluster_id"):
        assert col in t.column_names
    assert not {"role", "bytes", "normalized", "mode", "phash", "caption"} & set(t.column_names)  # no input had a caption
    rows = [r for s in m["shards"] for r in pq.read_table(run_dir / s["path"]).to_pylist()]
    seeds = [r for r in rows if r["source"] == "seed:seeds"]
    assert len(seeds) == 12 and all(r["method"] == "as_is" and r["seed_dataset"] == "seeds" for r in seeds)
    assert m["seeds"]["seeds"]["as_is_kept"] == 12
    assert all(hashlib.sha256(r["image"]["bytes"]).hexdigest() == r["sha256"] for r in rows)
    normalized = stage_values(run_dir, "decode", "normalized")
    assert all((r["id"] == r["sha256"]) != bool(normalized[r["uid"]]) for r in rows)  # stored bytes differ only when re-encoded
    assert len({r["key"] for r in rows}) == len(rows) and all(r["image"]["path"].startswith(r["key"] + ".") for r in rows)


def test_query_and_status_commands(run_dir):
    out = subprocess.run(
        [sys.executable, "-m", "curation.cli", "query", "select reason, count(*) n from ledger where decision='dropped' group by reason order by reason", "--run", str(run_dir), "--format", "json"],
        capture_output=True, text=True, check=True,
    ).stdout
    reasons = {r["reason"]: r["n"] for r in json.loads(out)}
    assert reasons == manifest(run_dir)["counts"]["dropped"]
    status = subprocess.run([sys.executable, "-m", "curation.cli", "status", "--run", str(run_dir)], capture_output=True, text=True, check=True).stdout
    assert "state: finished" in status


def test_rerun_is_a_no_op_and_changed_config_is_refused(run_dir, inputs):
    pool, seeds = inputs
    before = ledger_rows(run_dir)
    run_pipeline(RunRequest(pools=[str(pool)], seeds=[str(seeds)], out=run_dir, config=load_config("smoke")))
    assert ledger_rows(run_dir) == before
    changed = load_config("smoke", overrides={"stages": [{"kind": "decode", "min_side": 100}, {"kind": "exact_dedup"}]})
    with pytest.raises(RunError, match="different configuration"):
        run_pipeline(RunRequest(pools=[str(pool)], seeds=[str(seeds)], out=run_dir, config=changed))
