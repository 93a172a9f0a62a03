"""Output shards and the column contract, without Ray: the layout that rebalances kept rows to a
target size, the Parquet schema (HF Image layout + features metadata), the tar samples, the
dataset card; captions and pass-through columns read from the inputs."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pytest
import yaml

from curation import contract, schema
from curation.dataset_card import card_configs, dataset_card
from curation.emit import TarOut, plan_layout
from curation.ingest import parquet as pq_input
from curation.ingest import urls
from curation.ingest.rows import RowBuilder


def sizes(layout):
    return [sum(stop - start for _s, start, stop in out) for out in layout]


def test_rows_target_cuts_across_ingest_shards_in_order():
    counts = [(0, 4, None), (1, 0, None), (2, 9, None), (5, 3, None)]
    layout = plan_layout(counts, shard_rows=5, shard_bytes=None)
    assert layout == [[[0, 0, 4], [2, 0, 1]], [[2, 1, 6]], [[2, 6, 9], [5, 0, 2]], [[5, 2, 3]]]
    assert sizes(layout) == [5, 5, 5, 1]
    assert plan_layout(counts, 5, None) == layout  # a pure function of the markers: a resume cuts the same


def test_bytes_target_closes_a_shard_before_it_would_pass_and_a_huge_row_stands_alone():
    counts = [(0, 5, [40, 40, 40, 500, 10]), (1, 2, [30, 30])]
    layout = plan_layout(counts, shard_rows=None, shard_bytes=100)
    assert layout == [[[0, 0, 2]], [[0, 2, 3]], [[0, 3, 4]], [[0, 4, 5], [1, 0, 2]]]
    both = plan_layout(counts, shard_rows=2, shard_bytes=100)
    assert sizes(both) == [2, 1, 1, 2, 1]


def test_no_target_keeps_one_output_shard_per_non_empty_ingest_shard():
    assert plan_layout([(0, 3, None), (1, 0, None), (2, 2, None)], None, None) == [[[0, 0, 3]], [[2, 0, 2]]]


def contract_table(n=3, caption=True):
    uids = [schema.make_uid(4, i) for i in range(n)]
    blobs = [bytes([i]) * (10 + i) for i in range(n)]
    rows = pa.table({
        schema.UID: pa.array(uids, pa.int64()), schema.ROLE: ["pool"] * n, schema.ID: [f"id{i}" for i in range(n)],
        schema.SOURCE: ["pool"] * n, schema.SOURCE_KEY: [f"/p/{i}.jpg" for i in range(n)], schema.BYTES: pa.array(blobs, pa.binary()),
        schema.FORMAT: ["JPEG", "PNG", None][:n], schema.WIDTH: pa.array([10, 20, 30][:n], pa.int32()),
        schema.HEIGHT: pa.array([5, 6, 7][:n], pa.int32()), "url": [None] * n, "caption": ["a", None, "c"][:n],
        "method": ["pool"] * n, "aesthetic": [1.5, None, 2.5][:n],
    })
    original = pa.table({schema.UID: rows.column(schema.UID), schema.WIDTH: pa.array([5, 20, 30][:n], pa.int32()),
                         schema.HEIGHT: pa.array([10, 6, 7][:n], pa.int32())})
    out_schema = contract.output_schema(["caption"] if caption else [], [pa.field("aesthetic", pa.float64())])
    return contract.build(rows, original, out_schema), blobs


def test_the_contract_table_has_the_hf_image_layout_and_features_metadata():
    t, blobs = contract_table()
    assert t.schema.field("image").type == pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
    meta = json.loads(t.schema.metadata[b"huggingface"])
    assert meta == {"info": {"features": {"image": {"_type": "Image"}}}}
    assert json.loads(t.schema.metadata[b"curation"]) == {"contract": contract.CONTRACT}
    r = t.to_pylist()
    assert [x["key"] for x in r] == ["000004_0000000", "000004_0000001", "000004_0000002"]
    assert [x["image"]["path"] for x in r] == ["000004_0000000.jpg", "000004_0000001.png", "000004_0000002.img"]
    assert [x["image"]["bytes"] for x in r] == blobs
    assert (r[0]["width"], r[0]["height"], r[0]["original_width"], r[0]["original_height"]) == (10, 5, 5, 10)
    assert [x["caption"] for x in r] == ["a", None, "c"] and [x["aesthetic"] for x in r] == [1.5, None, 2.5]
    import hashlib

    assert all(x["sha256"] == hashlib.sha256(x["image"]["bytes"]).hexdigest() for x in r)
    assert "role" not in t.column_names and "bytes" not in t.column_names
    assert "caption" not in contract_table(caption=False)[0].column_names  # optional: only when some input had one


def test_hf_datasets_takes_the_image_feature_from_the_schema():
    datasets = pytest.importorskip("datasets")
    t, _ = contract_table()
    features = datasets.Features.from_arrow_schema(t.schema)
    assert isinstance(features["image"], datasets.Image)


def test_tar_samples_are_image_json_and_caption_with_fixed_member_metadata(tmp_path):
    t, blobs = contract_table()
    outs = []
    for name in ("a", "b"):
        w = TarOut(tmp_path / f"{name}.tar")
        w.write(t)
        outs.append(w.close(tmp_path))
    assert outs[0]["sha256"] == outs[1]["sha256"]  # the same rows give the same bytes
    with tarfile.open(tmp_path / "a.tar") as tf:
        names = tf.getnames()
        assert names == ["000004_0000000.jpg", "000004_0000000.json", "000004_0000000.txt", "000004_0000001.png",
                         "000004_0000001.json", "000004_0000002.img", "000004_0000002.json", "000004_0000002.txt"]
        assert tf.extractfile("000004_0000001.png").read() == blobs[1]
        meta = json.loads(tf.extractfile("000004_0000000.json").read())
        assert meta["key"] == "000004_0000000" and meta["aesthetic"] == 1.5 and "image" not in meta
        assert tf.extractfile("000004_0000002.txt").read() == b"c"
        assert {m.mtime for m in tf.getmembers()} == {0} and {m.uid for m in tf.getmembers()} == {0}


def test_the_dataset_card_points_load_dataset_at_the_dataset_only():
    manifest = {
        "counts": {"input": 10, "kept": 8, "dropped": {"corrupt": 2}}, "config": {"name": "lvd"}, "fingerprint": "f" * 16,
        "created": "2026-01-01T00:00:00Z", "run_dir": "/runs/x", "warnings": ["NSFW filtering was NOT applied"],
        "dataset": {"contract": contract.CONTRACT, "formats": ["parquet", "webdataset"], "columns": contract.describe([], [])},
    }
    card = dataset_card(manifest)
    header = yaml.safe_load(card.split("---")[1])
    assert header["configs"] == [{"config_name": "default", "data_files": [{"split": "train", "path": "dataset/*.parquet"}]}]
    assert "| `sha256` | `string` |" in card and "`corrupt`: 2" in card and "NOT applied" in card
    assert card_configs(["webdataset"])[0]["data_files"][0]["path"] == "webdataset/*.tar"


def test_captions_and_extra_columns_from_parquet_and_csv_inputs(tmp_path):
    import pyarrow.parquet as pq

    from curation.config import IngestConfig

    cfg = IngestConfig(extra_columns={"score": "float64", "tag": "string"})
    pq.write_table(pa.table({"url": ["http://a/1.jpg", "http://a/2.jpg"], "TEXT": ["one", "two"], "score": [0.5, 2.0],
                             "tag": [1, 2], "other": [0, 0]}), tmp_path / "urls.parquet")
    items = list(pq_input.iter_urls(str(tmp_path / "urls.parquet"), "url", cfg))
    assert items[1] == {"url": "http://a/2.jpg", "caption": "two", "extra": {"score": 2.0, "tag": 2}}
    (tmp_path / "urls.csv").write_text("url,caption,score\nhttp://a/1.jpg,a red car,0.25\n")
    assert list(urls.iter_csv(str(tmp_path / "urls.csv"), None, cfg)) == [
        {"url": "http://a/1.jpg", "caption": "a red car", "extra": {"score": "0.25"}}
    ]
    assert list(urls.iter_csv(str(tmp_path / "urls.csv"), None)) == ["http://a/1.jpg"]  # nothing asked: plain URLs
    rows = RowBuilder(0, "pool", "pool", None, cfg.extra_types())
    rows.add(0, "k", None, reason="bad_url", caption="a red car", extra={"score": "0.25", "tag": 7})
    row = rows.table().to_pylist()[0]
    assert (row["caption"], row["score"], row["tag"]) == ("a red car", 0.25, "7")  # typed as configured


def test_extra_columns_cannot_shadow_the_contract():
    from pydantic import ValidationError

    from curation.config import IngestConfig

    with pytest.raises(ValidationError, match="columns of the dataset already"):
        IngestConfig(extra_columns=["sha256", "score"])


def test_a_caption_tar_member_is_read(tmp_path):
    from curation.config import IngestConfig
    from curation.ingest.plan import SourceSpec, plan_units
    from curation.ingest.read import read_unit
    from tests.conftest import make_jpeg

    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for name, data in (("a.jpg", make_jpeg(1)), ("a.txt", b" a caption \n"), ("a.json", b'{"tag": "x"}')):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    cfg = IngestConfig(extra_columns=["tag"])
    unit = plan_units([SourceSpec(str(tmp_path / "s.tar"), "pool", "pool")], cfg)[0]
    row = read_unit(unit, cfg).to_pylist()[0]
    assert (row["caption"], row["tag"], row["drop_reason"]) == ("a caption", "x", None)
