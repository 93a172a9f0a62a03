"""Folder inputs: content sniffing, labels from class folders, and hostile file-system entries."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
from PIL import Image

from curation import schema
from curation.config import HttpConfig, IngestConfig
from curation.ingest import SourceSpec, plan_units, read_unit

CFG = IngestConfig(shard_size=1000)


def read_folder(path, cfg=CFG, role="pool", source="pool", seed_dataset=None) -> dict[str, dict]:
    """Rows of every unit planned for ``path``, keyed by path relative to it."""
    units = plan_units([SourceSpec(str(path), role, source, seed_dataset)], cfg)
    rows = [r for u in units for r in read_unit(u, cfg).to_pylist()]
    return {os.path.relpath(r["source_key"], path): r for r in rows}


def test_format_comes_from_content_not_the_file_name(shared_data):
    rows = read_folder(shared_data / "imagededup_fixtures" / "formats_images")
    # The same JPEG stored under four names.
    for name in ("ukbench09380.jpeg", "ukbench09380.bmp", "ukbench09380.png", "ukbench09380.svg"):
        assert rows[name]["format"] == "JPEG" and rows[name]["drop_reason"] is None, name
    assert len({rows[n]["id"] for n in ("ukbench09380.jpeg", "ukbench09380.bmp", "ukbench09380.svg")}) == 1
    assert rows["ukbench09380.webp"]["format"] == "WEBP"
    assert rows["copyleft.tiff"]["format"] == "TIFF"
    assert rows["giphy.gif"]["format"] == "GIF"
    assert {rows[n]["format"] for n in ("Iggy.1024.ppm", "baboon.pgm", "marbles.pbm")} == {"PPM"}
    assert all(r["width"] > 0 and r["height"] > 0 for r in rows.values())


def test_fixture_tree_sizes_ids_and_non_images(shared_data):
    root = shared_data / "imagededup_fixtures"
    rows = read_folder(root)
    manifest = {}
    for line in (root / "manifest.csv").read_text().splitlines()[1:]:
        path, _label, width, height, _size, sha, _src = line.split(",")
        manifest[path] = (width, height, sha)
    assert set(manifest) <= set(rows)  # every listed file is read (plus LICENSE, SOURCE.txt, ...)
    for path, (width, height, sha) in manifest.items():
        row = rows[path]
        assert row["id"] == sha
        if path.endswith(".pkl"):
            assert row["drop_reason"] == "not_image"
        elif width:
            # Sizes are reported as displayed, i.e. after the EXIF orientation is applied.
            with Image.open(root / path) as img:
                rotated = img.getexif().get(0x0112, 1) in (5, 6, 7, 8)
            expected = (int(height), int(width)) if rotated else (int(width), int(height))
            assert (row["width"], row["height"]) == expected, path
    assert rows["LICENSE"]["drop_reason"] == "not_image" and rows["LICENSE"]["bytes"] is None
    # The "corrupt" fixtures are scrambled from the first byte: not recognisable as an image.
    assert rows["mixed_images/ukbench09268_corrupt.jpg"]["drop_reason"] == "not_image"


def test_nested_folders_are_walked_and_labelled_by_first_level(shared_data):
    rows = read_folder(shared_data / "imagededup_fixtures" / "mixed_nested_images")
    assert rows["lvl1/lvl2a/ukbench00120_rotation.jpg"]["label"] == "lvl1"
    assert rows["lvl1/lvl2b/ukbench09268.jpg"]["label"] == "lvl1"
    assert rows["ukbench00120_hflip.jpg"]["label"] is None


def test_seed_rows_carry_role_source_and_class_labels(tmp_path, jpeg_factory):
    for cls in ("n01", "n02"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            (tmp_path / cls / f"{i}.JPEG").write_bytes(jpeg_factory(hash((cls, i)) % 1000))
    rows = read_folder(tmp_path, role="seed", source="seed:toy", seed_dataset="toy")
    assert sorted(rows) == ["n01/0.JPEG", "n01/1.JPEG", "n02/0.JPEG", "n02/1.JPEG"]
    assert {r["label"] for r in rows.values()} == {"n01", "n02"}
    assert {(r["role"], r["source"], r["seed_dataset"]) for r in rows.values()} == {("seed", "seed:toy", "toy")}
    assert all(r["bytes"] == (tmp_path / k).read_bytes() for k, r in rows.items())


def test_truncated_image_is_kept_for_the_decode_stage(tmp_path, jpeg_factory):
    data = jpeg_factory(1, size=(200, 150))
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    row = read_folder(tmp_path)["cut.jpg"]
    assert row["drop_reason"] is None and row["format"] == "JPEG" and row["bytes"] == data[: len(data) // 2]


def test_unreadable_header_is_kept_with_null_size(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    row = read_folder(tmp_path)["bad.png"]
    assert row["drop_reason"] is None and row["format"] == "PNG" and row["width"] is None


def test_zero_bytes_and_hidden_files(tmp_path, jpeg_factory):
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / ".hidden.jpg").write_bytes(jpeg_factory(2))
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.jpg").write_bytes(jpeg_factory(3))
    (tmp_path / "page.jpg").write_text("<html>not really</html>")
    rows = read_folder(tmp_path)
    assert sorted(rows) == ["empty.jpg", "page.jpg"]
    empty = rows["empty.jpg"]
    assert empty["drop_reason"] == "zero_bytes"
    assert empty["id"] == hashlib.sha256(b"").hexdigest()
    assert rows["page.jpg"]["drop_reason"] == "not_image"


def test_symlink_leaving_the_root_is_unsafe(tmp_path, jpeg_factory):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(jpeg_factory(4))
    root = tmp_path / "crawl"
    root.mkdir()
    (root / "real.jpg").write_bytes(jpeg_factory(5))
    (root / "inside_link.jpg").symlink_to(root / "real.jpg")
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    (root / "escape_dir").symlink_to(outside, target_is_directory=True)
    (root / "dangling.jpg").symlink_to(root / "missing.jpg")
    rows = read_folder(root)
    assert rows["inside_link.jpg"]["drop_reason"] is None
    assert rows["inside_link.jpg"]["id"] == rows["real.jpg"]["id"]
    for name in ("escape.jpg", "escape_dir"):
        assert rows[name]["drop_reason"] == "unsafe_path" and rows[name]["bytes"] is None
        assert json.loads(rows[name]["drop_details"])["resolved"].startswith(str(outside.resolve()))
    assert rows["dangling.jpg"]["drop_reason"] == "read_error"
    assert "escape_dir/secret.jpg" not in rows


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_never_opened(tmp_path, jpeg_factory):
    (tmp_path / "a.jpg").write_bytes(jpeg_factory(6))
    os.mkfifo(tmp_path / "pipe.jpg")
    rows = read_folder(tmp_path)
    assert rows["pipe.jpg"]["drop_reason"] == "unsafe_path"
    assert rows["a.jpg"]["drop_reason"] is None


def test_file_over_the_byte_cap_is_too_large(tmp_path, jpeg_factory):
    big = jpeg_factory(7, size=(300, 300))
    (tmp_path / "big.jpg").write_bytes(big)
    cfg = IngestConfig(http=HttpConfig(max_bytes=len(big) - 1))
    row = read_folder(tmp_path, cfg)["big.jpg"]
    assert row["drop_reason"] == "too_large" and row["bytes"] is None


def test_uids_follow_the_plan(tmp_path, jpeg_factory):
    for i in range(5):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_factory(i))
    cfg = IngestConfig(shard_size=2)
    units = plan_units([SourceSpec(str(tmp_path), "pool", "pool")], cfg)
    uids = [r["uid"] for u in units for r in read_unit(u, cfg).to_pylist()]
    assert uids == [schema.make_uid(s, r) for s, r in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]]
