"""WebDataset / img2dataset tar shards, including crafted hostile archives."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from curation.config import IngestConfig, UrlRulesConfig
from curation.ingest import SourceSpec, plan_units, read_unit
from curation.ingest.tars import sample_key

CFG = IngestConfig()


def add(tf: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for k, v in attrs.items():
        setattr(info, k, v)
    tf.addfile(info, io.BytesIO(data) if data else None)


def read_all(path, cfg=CFG) -> list[dict]:
    units = plan_units([SourceSpec(str(path), "pool", "pool")], cfg)
    return [r for u in units for r in read_unit(u, cfg).to_pylist()]


def by_member(rows) -> dict[str, dict]:
    return {r["source_key"].split("::", 1)[1]: r for r in rows}


@pytest.fixture
def img2dataset_tar(tmp_path, jpeg_factory):
    """Two img2dataset samples (jpg + json with url + txt caption) and a webdataset .cls sample."""
    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w") as tf:
        for i, key in enumerate(["000000000", "000000001"]):
            add(tf, f"{key}.jpg", jpeg_factory(i))
            add(tf, f"{key}.txt", b"a caption")
            add(tf, f"{key}.json", json.dumps({"url": f"http://img{i}.example/{key}.jpg", "key": key, "status": "success"}).encode())
        add(tf, "shard/cat.0001.png", jpeg_factory(9))  # JPEG bytes under a .png name, multi-dot name
        add(tf, "shard/cat.0001.cls", b"281\n")
    return path


def test_samples_group_members_and_read_metadata(img2dataset_tar, jpeg_factory):
    rows = by_member(read_all(img2dataset_tar))
    assert sorted(rows) == ["000000000.jpg", "000000001.jpg", "shard/cat.0001.png"]
    first = rows["000000000.jpg"]
    assert first["drop_reason"] is None and first["bytes"] == jpeg_factory(0)
    assert first["url"] == "http://img0.example/000000000.jpg" and first["format"] == "JPEG"
    assert first["source_key"] == f"{img2dataset_tar}::000000000.jpg"
    cls = rows["shard/cat.0001.png"]
    assert cls["label"] == "281" and cls["format"] == "JPEG" and cls["url"] is None


def test_webdataset_key_convention():
    assert sample_key("a/b/c.seg.jpg") == ("a/b/c", "seg.jpg")
    assert sample_key("000123.JSON") == ("000123", "json")


def test_metadata_url_is_checked_against_blocklists(img2dataset_tar):
    cfg = IngestConfig(url_rules=UrlRulesConfig(domains=["img1.example"]))
    rows = by_member(read_all(img2dataset_tar, cfg))
    assert rows["000000000.jpg"]["drop_reason"] is None
    blocked = rows["000000001.jpg"]
    assert blocked["drop_reason"] == "blocked_domain" and blocked["bytes"] is None
    assert json.loads(blocked["drop_details"])["domain"] == "img1.example"


def test_hostile_members_are_unsafe(tmp_path, jpeg_factory):
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "good.jpg", jpeg_factory(1))
        add(tf, "../escape.jpg", jpeg_factory(2))
        add(tf, "/etc/absolute.jpg", jpeg_factory(3))
        add(tf, "link.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        add(tf, "hard.jpg", type=tarfile.LNKTYPE, linkname="good.jpg")
        add(tf, "dev.jpg", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        add(tf, "fifo.jpg", type=tarfile.FIFOTYPE)
        # A sample whose image is fine but carries a symlinked sidecar is rejected as a whole.
        add(tf, "mixed.jpg", jpeg_factory(4))
        add(tf, "mixed.json", type=tarfile.SYMTYPE, linkname="../../secrets.json")
    rows = by_member(read_all(path))
    assert rows["good.jpg"]["drop_reason"] is None
    unsafe = ["../escape.jpg", "/etc/absolute.jpg", "link.jpg", "hard.jpg", "dev.jpg", "fifo.jpg", "mixed.json"]
    for name in unsafe:
        assert rows[name]["drop_reason"] == "unsafe_member", name
        assert rows[name]["bytes"] is None
    assert "symbolic link" in json.loads(rows["link.jpg"]["drop_details"])["error"]
    assert len(rows) == 1 + len(unsafe)


def test_samples_without_a_usable_image(tmp_path):
    path = tmp_path / "odd.tar"
    with tarfile.open(path, "w") as tf:
        add(tf, "a.json", b'{"url": "http://x.example/a.jpg"}')
        add(tf, "b.jpg", b"")
        add(tf, "c.jpg", b"<html></html>")
    rows = {r["source_key"].split("::")[1]: r for r in read_all(path)}
    assert rows["a.json"]["drop_reason"] == "missing_bytes" and rows["a.json"]["url"] == "http://x.example/a.jpg"
    assert rows["b.jpg"]["drop_reason"] == "zero_bytes"
    assert rows["c.jpg"]["drop_reason"] == "not_image"


def test_a_file_that_is_not_a_tar_is_one_malformed_shard_row(tmp_path):
    path = tmp_path / "broken.tar"
    path.write_bytes(b"this is not a tar archive" * 100)
    units = plan_units([SourceSpec(str(path), "pool", "pool")], CFG)
    assert [u.kind for u in units] == ["error"]
    rows = read_unit(units[0], CFG).to_pylist()
    assert len(rows) == 1 and rows[0]["drop_reason"] == "malformed_shard"
    assert rows[0]["source_key"] == str(path) and "cannot open tar" in rows[0]["drop_details"]


def test_truncated_tar_keeps_the_samples_before_the_damage(tmp_path, jpeg_factory):
    path = tmp_path / "cut.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(4):
            add(tf, f"{i}.jpg", jpeg_factory(i, size=(120, 90)))
    with tarfile.open(path) as tf:
        third = tf.getmember("2.jpg")
    data = path.read_bytes()
    path.write_bytes(data[: third.offset_data + third.size // 2])  # cut inside the third image
    rows = read_all(path)
    assert [r["drop_reason"] for r in rows[:2]] == [None, None]
    cut = rows[2]
    assert cut["source_key"].endswith("::2.jpg") and cut["drop_reason"] == "malformed_shard" and cut["bytes"] is None
    # The scan's own error (end of data where a header was due) is reported once more for the file.
    assert [(r["drop_reason"], r["source_key"]) for r in rows[3:]] == [("malformed_shard", str(path))]


def test_folder_of_img2dataset_shards_ignores_their_sidecar_files(tmp_path, jpeg_factory):
    for shard in range(2):
        with tarfile.open(tmp_path / f"{shard:05d}.tar", "w") as tf:
            add(tf, f"{shard}0.jpg", jpeg_factory(shard))
        (tmp_path / f"{shard:05d}_stats.json").write_text("{}")
        (tmp_path / f"{shard:05d}.parquet").write_bytes(b"metadata parquet img2dataset writes")
    units = plan_units([SourceSpec(str(tmp_path), "pool", "pool")], CFG)
    assert [(u.kind, u.location) for u in units] == [("tar", str(tmp_path / "00000.tar")), ("tar", str(tmp_path / "00001.tar"))]


def test_large_tar_is_cut_into_units_that_read_by_offset(tmp_path, jpeg_factory):
    path = tmp_path / "many.tar"
    with tarfile.open(path, "w") as tf:
        for i in range(7):
            add(tf, f"{i:03d}.jpg", jpeg_factory(i))
            add(tf, f"{i:03d}.json", json.dumps({"label": f"c{i}"}).encode())
    cfg = IngestConfig(shard_size=3)
    units = plan_units([SourceSpec(str(path), "pool", "pool")], cfg)
    assert [len(u.items) for u in units] == [3, 3, 1]
    rows = [r for u in units for r in read_unit(u, cfg).to_pylist()]
    assert [r["bytes"] for r in rows] == [jpeg_factory(i) for i in range(7)]
    assert [r["label"] for r in rows] == [f"c{i}" for i in range(7)]
