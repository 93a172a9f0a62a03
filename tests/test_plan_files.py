"""The streamed plan: the same units and uids as the in-memory plan made before plan files, a
plan killed while written is made again, and a long URL list spans several plan files."""

from __future__ import annotations

import json
import os
import random
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.config import IngestConfig
from curation.ingest import SourceSpec, read_unit
from curation.ingest.files import walk_files
from curation.ingest.inputs import fingerprint_inputs
from curation.ingest.plan import plan_units
from curation.plan_files import INDEX, Plan, read_plan_unit
from curation.planning import InputsChanged, load_or_make_plan
from curation.store import RunStore

POOL_FILES = ["a.jpg", "a-b.jpg", "a/x.jpg", "a/y/z.jpg", "B.jpg", "ab/c.jpg", ".hidden.jpg", ".h/q.jpg", "a b/1.jpg", "z.jpg", "é.jpg", "a0.jpg"]


@pytest.fixture
def mix(tmp_path):
    """A folder with names that sort differently per folder than as full paths, links, a tar,
    an image Parquet, a URL Parquet with captions, a .txt and a .csv URL list, a CSV without a
    URL column and a seed folder of tars."""
    root = tmp_path / "in"
    pool = root / "pool"
    for rel in POOL_FILES:
        (pool / rel).parent.mkdir(parents=True, exist_ok=True)
        (pool / rel).write_bytes(b"x" * len(rel))
    os.symlink("/etc", pool / "outside")  # listed (refused at read time), as before
    os.symlink(pool / "a", pool / "inside")  # a folder link inside the root: not listed
    member = root / "m.bin"
    member.write_bytes(b"{}")
    with tarfile.open(root / "s.tar", "w") as tf:
        for i in range(5):
            for ext in ("jpg", "json"):
                tf.add(member, arcname=f"{i:03d}.{ext}")
    pq.write_table(pa.table({"image": [b"x"] * 7}), root / "img.parquet")
    pq.write_table(pa.table({"url": [f"http://127.0.0.1/p{i}.jpg" for i in range(5)], "caption": [f"c{i}" for i in range(5)]}),
                   root / "urls.parquet")
    (root / "l.txt").write_text("# c\n" + "".join(f"  http://127.0.0.1/t{i}.jpg \n\n" for i in range(7)))
    (root / "l.csv").write_text("id,url,caption\n" + "".join(f'{i},http://127.0.0.1/c{i}.jpg,"x, {i}"\n' for i in range(4)))
    (root / "bad.csv").write_text("id,caption\n1,a\n")
    (root / "tars").mkdir()
    for name in ("b.tar", "a.tar"):
        with tarfile.open(root / "tars" / name, "w") as tf:
            tf.add(member, arcname="k.jpg")
    names = ["s.tar", "img.parquet", "urls.parquet", "l.txt", "l.csv", "bad.csv"]
    specs = [SourceSpec(str(pool), "pool", "pool"), *(SourceSpec(str(root / n), "pool", "pool") for n in names),
             SourceSpec(str(root / "tars"), "seed", "seed:t", "t")]
    return root, specs


def _url(i, prefix="p", caption=None):
    return {"url": f"http://127.0.0.1/{prefix}{i}.jpg", "caption": caption if caption is not None else f"c{i}", "extra": {}}


# What the plan held before it was streamed (plan_units on the list-building planner, same inputs).
BEFORE = [
    (0, "pool", "files", "pool", ["B.jpg", "a b/1.jpg", "a-b.jpg"]),
    (1, "pool", "files", "pool", ["a.jpg", "a/x.jpg", "a/y/z.jpg"]),
    (2, "pool", "files", "pool", ["a0.jpg", "ab/c.jpg", "outside"]),
    (3, "pool", "files", "pool", ["z.jpg", "é.jpg"]),
    (4, "pool", "tar", "s.tar", ["000", "001", "002"]),
    (5, "pool", "tar", "s.tar", ["003", "004"]),
    (6, "pool", "parquet", "img.parquet", [0, 1, 2]),
    (7, "pool", "parquet", "img.parquet", [3, 4, 5]),
    (8, "pool", "parquet", "img.parquet", [6]),
    (9, "pool", "urls", "urls.parquet", [_url(0), _url(1), _url(2)]),
    (10, "pool", "urls", "urls.parquet", [_url(3), _url(4)]),
    (11, "pool", "urls", "l.txt", [f"http://127.0.0.1/t{i}.jpg" for i in range(3)]),
    (12, "pool", "urls", "l.txt", [f"http://127.0.0.1/t{i}.jpg" for i in range(3, 6)]),
    (13, "pool", "urls", "l.txt", ["http://127.0.0.1/t6.jpg"]),
    (14, "pool", "urls", "l.csv", [_url(i, "c", f"x, {i}") for i in range(3)]),
    (15, "pool", "urls", "l.csv", [_url(3, "c", "x, 3")]),
    (16, "pool", "error", "bad.csv", [{"error": "cannot read URL list: CSV has no URL column (header: id, caption); set ingest.url_column"}]),
    (17, "seed:t", "tar", "tars/a.tar", ["k"]),
    (18, "seed:t", "tar", "tars/b.tar", ["k"]),
]


def _facts(units, root):
    return [(u.shard, u.spec.source, u.kind, os.path.relpath(u.location, root), [i["key"] for i in u.items] if u.kind == "tar" else list(u.items))
            for u in units]


def test_streamed_plan_has_the_units_and_uids_of_the_plan_before(mix, tmp_path):
    root, specs = mix
    cfg = IngestConfig(shard_size=3)
    plan = load_or_make_plan(RunStore(tmp_path / "run"), specs, cfg)
    assert _facts(plan.units(), root) == BEFORE
    assert _facts(plan_units(specs, cfg), root) == BEFORE
    assert plan.num_units == 19 and plan.num_items == sum(len(b[4]) for b in BEFORE)
    assert plan.sizes() == {b[0]: len(b[4]) for b in BEFORE}
    assert _facts([read_plan_unit(plan.file_of(s), s) for s in plan.shards()], root) == BEFORE  # what a worker reads
    rows = read_unit(read_plan_unit(plan.file_of(1), 1), cfg).to_pylist()
    assert [r["uid"] for r in rows] == [schema.make_uid(1, i) for i in range(3)]
    assert [os.path.relpath(r["source_key"], root / "pool") for r in rows] == ["a.jpg", "a/x.jpg", "a/y/z.jpg"]
    assert not (tmp_path / "run" / "plan.json").exists()


def test_the_walk_gives_the_sorted_order_of_full_paths(tmp_path):
    rng = random.Random(7)
    names = ["a", "a-b", "a.b", "a b", "ab", "a0", "a~", "B", "é", "a_", "b"]  # prefixes of one another
    made: set[str] = set()
    for _ in range(400):
        rel = "/".join(rng.choice(names) for _ in range(rng.randint(1, 3)))
        if any(m.startswith(rel + "/") or rel.startswith(m + "/") or m == rel for m in made):
            continue  # a name is a file or a folder, not both
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"")
        made.add(rel)
    assert len(made) > 60
    assert list(walk_files(tmp_path)) == sorted(made)


def test_a_plan_killed_while_written_is_made_again(mix, tmp_path):
    root, specs = mix
    cfg = IngestConfig(shard_size=3)
    store = RunStore(tmp_path / "run")
    plan = load_or_make_plan(store, specs, cfg)
    (store.plan_dir / INDEX).unlink()  # killed before the index: the files may be any prefix
    (store.plan_dir / "part-000007.parquet").write_bytes(b"left by the killed planner")
    assert Plan.open(store.plan_dir) is None
    again = load_or_make_plan(store, specs, cfg)
    assert _facts(again.units(), root) == BEFORE
    assert sorted(p.name for p in store.plan_dir.iterdir()) == sorted([INDEX, *(p.name for p in plan.paths())])


def test_a_plan_stopped_by_an_unplannable_input_is_not_taken_for_a_plan(mix, tmp_path):
    root, specs = mix
    store = RunStore(tmp_path / "run")
    missing = [*specs[:2], SourceSpec(str(root / "absent.txt"), "pool", "pool")]
    with pytest.raises(Exception, match="does not exist"):
        load_or_make_plan(store, missing, IngestConfig(shard_size=3))
    assert store.plan_dir.is_dir() and Plan.open(store.plan_dir) is None
    plan = load_or_make_plan(store, specs, IngestConfig(shard_size=3))
    assert _facts(plan.units(), root) == BEFORE


def test_a_long_url_list_spans_several_plan_files_and_resume_reads_them(tmp_path):
    lines = [f"http://127.0.0.1/img/{i:07d}.jpg" for i in range(200_000)]
    path = tmp_path / "urls.txt"
    path.write_text("\n".join(lines) + "\n")
    store, specs, cfg = RunStore(tmp_path / "run"), [SourceSpec(str(path), "pool", "pool")], IngestConfig(shard_size=1000)
    plan = load_or_make_plan(store, specs, cfg)
    files = plan.paths()
    assert len(files) >= 3 and plan.num_units == 200 and plan.num_items == 200_000
    assert all(pq.ParquetFile(f).metadata.num_rows <= 1024 for f in files)
    stamps = {f: f.stat().st_mtime_ns for f in files}
    resumed = load_or_make_plan(store, specs, cfg)
    assert {f: f.stat().st_mtime_ns for f in resumed.paths()} == stamps  # read back, not planned again
    assert [u.shard for u in resumed.units()] == list(range(200))
    assert [i for u in resumed.units() for i in u.items] == lines
    assert read_plan_unit(resumed.file_of(137), 137).items == tuple(lines[137_000:138_000])
    assert set(resumed.sizes().values()) == {1000}


def test_a_url_list_damaged_part_way_keeps_what_was_read_before(tmp_path):
    path = tmp_path / "urls.txt"
    good = [f"http://127.0.0.1/{i:06d}.jpg" for i in range(5000)]
    path.write_bytes(("\n".join(good) + "\n").encode() + b"\xff\xfe broken\n")
    units = plan_units([SourceSpec(str(path), "pool", "pool")], IngestConfig(shard_size=1000))
    assert units[-1].kind == "error" and "cannot read URL list" in units[-1].items[0]["error"]
    read = [i for u in units[:-1] for i in u.items]
    assert {u.kind for u in units[:-1]} == {"urls"} and len(read) >= 4000 and read == good[: len(read)]


def test_changed_inputs_are_refused_and_replan_discards_the_old_outputs(mix, tmp_path):
    root, specs = mix
    store, cfg = RunStore(tmp_path / "run"), IngestConfig(shard_size=3)
    load_or_make_plan(store, specs, cfg)
    (root / "pool" / "zz.jpg").write_bytes(b"new")
    with pytest.raises(InputsChanged, match=r"1 new \(.*zz\.jpg\)"):
        load_or_make_plan(store, specs, cfg)
    (store.run_dir / "stages" / "00_ingest").mkdir(parents=True)
    plan = load_or_make_plan(store, specs, cfg, replan=True)
    assert not (store.run_dir / "stages").exists() and not store.replan_json.exists()
    assert [i for u in plan.units() if u.shard == 3 for i in u.items] == ["z.jpg", "zz.jpg", "é.jpg"]


def test_a_plan_json_of_an_older_run_is_converted_once(mix, tmp_path):
    root, specs = mix
    store, cfg = RunStore(tmp_path / "run"), IngestConfig(shard_size=3)
    store.run_dir.mkdir()
    units = plan_units(specs, cfg)
    store.legacy_plan_json.write_text(json.dumps({"units": [u.to_dict() for u in units], "inputs": fingerprint_inputs(specs).to_dict()}))
    plan = load_or_make_plan(store, specs, cfg)
    assert not store.legacy_plan_json.exists() and list(plan.units()) == units
    assert Plan.open(store.plan_dir).num_units == len(units)
