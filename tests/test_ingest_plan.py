"""The ingest plan: deterministic, dense shards; clear errors for inputs that cannot be planned."""

from __future__ import annotations

import json
import os
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation import schema
from curation.config import HttpConfig, IngestConfig
from curation.ingest import IngestError, SourceSpec, WorkUnit, plan_units, read_unit
from tests.http_fixtures import LOOPBACK_HTTP, ImageServer


@pytest.fixture
def mixed_inputs(tmp_path, jpeg_factory):
    """A pool folder, a tar shard, a Parquet file and a seed folder of class subfolders."""
    pool = tmp_path / "pool"
    (pool / "b").mkdir(parents=True)
    for i in range(5):
        (pool / ("b" if i % 2 else "") / f"{i}.jpg").write_bytes(jpeg_factory(i))
    with tarfile.open(tmp_path / "shard.tar", "w") as tf:
        for i in range(3):
            tf.add(pool / ("b" if i % 2 else "") / f"{i}.jpg", arcname=f"{i:04d}.jpg")
    pq.write_table(pa.table({"image": [jpeg_factory(10 + i) for i in range(4)]}), tmp_path / "images.parquet")
    seeds = tmp_path / "seeds"
    for cls in ("x", "y"):
        (seeds / cls).mkdir(parents=True)
        (seeds / cls / "s.jpg").write_bytes(jpeg_factory(ord(cls)))
    return [
        SourceSpec(str(pool), schema.POOL, "pool"),
        SourceSpec(str(tmp_path / "shard.tar"), schema.POOL, "pool"),
        SourceSpec(str(tmp_path / "images.parquet"), schema.POOL, "pool"),
        SourceSpec(str(seeds), schema.SEED, "seed:toy", "toy"),
    ]


def test_plan_is_deterministic_dense_and_bounded(mixed_inputs):
    cfg = IngestConfig(shard_size=2)
    first, second = plan_units(mixed_inputs, cfg), plan_units(mixed_inputs, cfg)
    assert first == second
    assert [u.shard for u in first] == list(range(len(first)))
    assert [(u.kind, len(u.items)) for u in first] == [
        ("files", 2), ("files", 2), ("files", 1), ("tar", 2), ("tar", 1), ("parquet", 2), ("parquet", 2), ("files", 2)
    ]
    assert [u.spec.source for u in first] == ["pool"] * 7 + ["seed:toy"]


def test_units_survive_a_json_round_trip(mixed_inputs):
    for unit in plan_units(mixed_inputs, IngestConfig(shard_size=3)):
        assert WorkUnit.from_dict(json.loads(json.dumps(unit.to_dict()))) == unit


def test_rerun_gives_the_same_uids_and_ids(mixed_inputs):
    cfg = IngestConfig(shard_size=2)

    def read_all():
        return [(r["uid"], r["id"], r["source_key"]) for u in plan_units(mixed_inputs, cfg) for r in read_unit(u, cfg).to_pylist()]

    rows = read_all()
    assert rows == read_all()
    assert len({uid for uid, _, _ in rows}) == len(rows) == 5 + 3 + 4 + 2


def test_folder_walk_is_sorted(tmp_path, jpeg_factory):
    for name in ("z.jpg", "a.jpg", "m/b.jpg", "m/a.jpg", "B.jpg"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(jpeg_factory(len(name)))
    (unit,) = plan_units([SourceSpec(str(tmp_path), "pool", "pool")], IngestConfig())
    assert unit.items == ("B.jpg", "a.jpg", "m/a.jpg", "m/b.jpg", "z.jpg")


def test_glob_expands_to_sorted_matches(tmp_path, jpeg_factory):
    for i in (2, 0, 1):
        pq.write_table(pa.table({"image": [jpeg_factory(i)]}), tmp_path / f"part-{i}.parquet")
    units = plan_units([SourceSpec(str(tmp_path / "part-*.parquet"), "pool", "pool")], IngestConfig())
    assert [os.path.basename(u.location) for u in units] == ["part-0.parquet", "part-1.parquet", "part-2.parquet"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "absent", "does not exist"),
        (lambda d: d / "nothing-*.tar", "no files match"),
        (lambda d: (d / "photo.jpg").write_bytes(b"x") and d / "photo.jpg", "unknown input kind '.jpg'"),
        (lambda d: (d / "archive.zip").write_bytes(b"x") and d / "archive.zip", "unknown input kind '.zip'"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "holds no input items"),
    ],
)
def test_unplannable_paths_raise_a_clear_error(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(IngestError, match=message):
        plan_units([SourceSpec(str(path), "pool", "pool")], IngestConfig())


def test_unknown_role_is_refused(tmp_path, jpeg_factory):
    (tmp_path / "a.jpg").write_bytes(jpeg_factory(0))
    with pytest.raises(IngestError, match="role 'crawl'"):
        plan_units([SourceSpec(str(tmp_path), "crawl", "pool")], IngestConfig())


# -- URL lists ------------------------------------------------------------------------------
def test_url_lists_in_txt_csv_and_parquet_are_downloaded(tmp_path):
    with ImageServer(n_images=4) as server:
        txt = tmp_path / "list.txt"
        txt.write_text(f"# crawl 2024-01\n{server.url('/img/0.jpg')}\n\n  {server.url('/img/1.jpg')}  \n")
        csv = tmp_path / "list.csv"
        csv.write_text(f"id,image_url,caption\n1,{server.url('/img/2.jpg')},\"a, b\"\n2,{server.url('/status/404')},c\n")
        parquet = tmp_path / "list.parquet"
        pq.write_table(pa.table({"url": [server.url("/img/3.jpg")]}), parquet)
        specs = [SourceSpec(str(p), "pool", "pool") for p in (txt, csv, parquet)]
        cfg = IngestConfig(http=HttpConfig(retries=0, read_timeout=5, **LOOPBACK_HTTP))
        units = plan_units(specs, cfg)
        assert [(u.kind, len(u.items)) for u in units] == [("urls", 2), ("urls", 2), ("urls", 1)]
        rows = [r for u in units for r in read_unit(u, cfg).to_pylist()]
        assert [r["drop_reason"] for r in rows] == [None, None, None, "http_404", None]
        assert [r["bytes"] for r in rows if r["drop_reason"] is None] == [server.image(i) for i in range(4)]
        assert rows[1]["source_key"] == server.url("/img/1.jpg")


def test_csv_without_a_url_column_is_a_malformed_shard(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("id,caption\n1,a dog\n")
    (unit,) = plan_units([SourceSpec(str(path), "pool", "pool")], IngestConfig())
    assert unit.kind == "error"
    (row,) = read_unit(unit, IngestConfig()).to_pylist()
    assert row["drop_reason"] == "malformed_shard" and "no URL column" in row["drop_details"]
    assert row["uid"] == schema.make_uid(0, 0)


def test_url_list_that_is_not_text_is_a_malformed_shard(tmp_path):
    path = tmp_path / "list.txt"
    path.write_bytes(b"\xff\xfe\x00binary")
    (unit,) = plan_units([SourceSpec(str(path), "pool", "pool")], IngestConfig())
    (row,) = read_unit(unit, IngestConfig()).to_pylist()
    assert row["drop_reason"] == "malformed_shard"
