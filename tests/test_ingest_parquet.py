"""Parquet inputs: raw bytes columns, Hugging Face image structs, URL columns, broken files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import IngestConfig, UrlRulesConfig
from curation.ingest import SourceSpec, plan_units, read_unit

CFG = IngestConfig()


def plan(path, cfg=CFG):
    return plan_units([SourceSpec(str(path), "pool", "pool")], cfg)


def read_all(path, cfg=CFG) -> list[dict]:
    return [r for u in plan(path, cfg) for r in read_unit(u, cfg).to_pylist()]


def test_binary_image_column_with_url_and_label(tmp_path, jpeg_factory):
    path = tmp_path / "images.parquet"
    images = [jpeg_factory(i) for i in range(5)]
    table = pa.table({
        "jpg": pa.array(images, pa.binary()),
        "url": [f"http://h{i}.example/{i}.jpg" for i in range(5)],
        "label": ["a", "b", "a", None, "c"],
    })
    pq.write_table(table, path, row_group_size=2)
    cfg = IngestConfig(shard_size=3, url_rules=UrlRulesConfig(domains=["h3.example"]))
    units = plan(path, cfg)
    assert [(u.kind, len(u.items)) for u in units] == [("parquet", 3), ("parquet", 2)]
    rows = [r for u in units for r in read_unit(u, cfg).to_pylist()]
    assert [r["source_key"] for r in rows] == [f"{path}::{i}" for i in range(5)]
    assert [r["label"] for r in rows] == ["a", "b", "a", None, "c"]
    assert [r["url"] for r in rows] == table.column("url").to_pylist()
    assert [r["drop_reason"] for r in rows] == [None, None, None, "blocked_domain", None]
    assert [r["bytes"] for r in rows] == images[:3] + [None] + images[4:]


def test_hugging_face_image_struct_and_class_label_names(tmp_path, jpeg_factory):
    path = tmp_path / "train-00000-of-00001.parquet"
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    images = pa.array(
        [{"bytes": jpeg_factory(0), "path": "0.jpg"}, {"bytes": None, "path": "/data/missing.jpg"}, {"bytes": b"", "path": None}],
        image_type,
    )
    features = {"image": {"_type": "Image"}, "label": {"names": ["cat", "dog"], "_type": "ClassLabel"}}
    schema = pa.schema([("image", image_type), ("label", pa.int64())], metadata={"huggingface": json.dumps({"info": {"features": features}})})
    pq.write_table(pa.table([images, pa.array([1, 0, 1])], schema=schema), path)
    rows = read_all(path)
    assert rows[0]["drop_reason"] is None and rows[0]["bytes"] == jpeg_factory(0) and rows[0]["label"] == "dog"
    assert rows[1]["drop_reason"] == "missing_bytes" and json.loads(rows[1]["drop_details"])["path"] == "/data/missing.jpg"
    assert rows[1]["label"] == "cat"
    assert rows[2]["drop_reason"] == "zero_bytes"


def test_configured_bytes_column_wins(tmp_path, jpeg_factory):
    path = tmp_path / "custom.parquet"
    pq.write_table(pa.table({"thumbnail": [b"not an image"], "pixels": [jpeg_factory(3)]}), path)
    rows = read_all(path, IngestConfig(bytes_column="pixels"))
    assert rows[0]["drop_reason"] is None and rows[0]["bytes"] == jpeg_factory(3)


def test_url_column_makes_a_url_unit(tmp_path):
    path = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"image_url": ["http://a.example/1.jpg", None, "http://b.example/2.jpg"], "caption": ["x", "y", "z"]}), path)
    units = plan(path)
    # A URL list in Parquet keeps each row's caption (and configured extra columns) with its URL.
    assert [(u.kind, u.items) for u in units] == [("urls", (
        {"url": "http://a.example/1.jpg", "caption": "x", "extra": {}},
        {"url": "", "caption": "y", "extra": {}},
        {"url": "http://b.example/2.jpg", "caption": "z", "extra": {}},
    ))]


@pytest.mark.parametrize(
    "writer, message",
    [
        (lambda p: p.write_bytes(b"PAR1 but not really parquet"), "cannot read Parquet"),
        (lambda p: pq.write_table(pa.table({"caption": ["a"], "width": [3]}), p), "no image-bytes or URL column"),
    ],
)
def test_unusable_parquet_is_one_malformed_shard_row(tmp_path, writer, message):
    path = tmp_path / "bad.parquet"
    writer(path)
    units = plan(path)
    assert [u.kind for u in units] == ["error"]
    rows = read_unit(units[0], CFG).to_pylist()
    assert [r["drop_reason"] for r in rows] == ["malformed_shard"]
    assert message in json.loads(rows[0]["drop_details"])["error"]


def test_parquet_damaged_after_planning_drops_the_unit_rows(tmp_path, jpeg_factory):
    path = tmp_path / "images.parquet"
    pq.write_table(pa.table({"image": [jpeg_factory(0), jpeg_factory(1)]}), path)
    units = plan(path)
    path.write_bytes(b"overwritten")
    rows = read_unit(units[0], CFG).to_pylist()
    assert [r["drop_reason"] for r in rows] == ["malformed_shard", "malformed_shard"]
    assert [r["source_key"] for r in rows] == [f"{path}::0", f"{path}::1"]


def test_folder_of_parquet_files(tmp_path, jpeg_factory):
    for i in range(3):
        pq.write_table(pa.table({"image": [jpeg_factory(i)]}), tmp_path / f"part-{i}.parquet")
    rows = read_all(tmp_path)
    assert [r["source_key"] for r in rows] == [f"{tmp_path}/part-{i}.parquet::0" for i in range(3)]
    assert all(r["drop_reason"] is None for r in rows)
