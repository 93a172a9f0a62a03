"""The input fingerprint notices new, removed and modified pool inputs since the plan was made."""

from __future__ import annotations

import json
import os
import tarfile

import pytest

from curation import schema
from curation.ingest import SourceSpec
from curation.ingest.inputs import InputFingerprint, compare, fingerprint_inputs, inputs_changed


def pool(path) -> list[SourceSpec]:
    return [SourceSpec(str(path), schema.POOL, "pool")]


def saved(specs) -> dict:
    """The fingerprint as the runner stores it: through JSON."""
    return json.loads(json.dumps(fingerprint_inputs(specs).to_dict()))


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "pool"
    (root / "sub").mkdir(parents=True)
    for i in range(5):
        (root / ("sub" if i % 2 else ".") / f"{i}.jpg").write_bytes(b"x" * (10 + i))
    return root


def test_unchanged_inputs_give_the_same_fingerprint(folder):
    stored = saved(pool(folder))
    assert inputs_changed(stored, pool(folder)) is None
    assert fingerprint_inputs(pool(folder)).digest == stored["digest"]
    assert InputFingerprint.from_dict(stored).num_files == 5


def test_a_new_file_in_a_pool_folder_is_named(folder):
    stored = saved(pool(folder))
    (folder / "sub" / "new.jpg").write_bytes(b"new")
    message = inputs_changed(stored, pool(folder))
    assert message == f"the inputs changed since the plan was made: 1 new ({folder / 'sub' / 'new.jpg'})"


def test_removed_and_modified_files_are_named(folder):
    stored = saved(pool(folder))
    (folder / "0.jpg").unlink()
    (folder / "2.jpg").write_bytes(b"longer content than before")
    st = os.stat(folder / "sub" / "1.jpg")
    os.utime(folder / "sub" / "1.jpg", ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched only
    changes = compare(InputFingerprint.from_dict(stored), fingerprint_inputs(pool(folder)))
    assert changes.new == [] and changes.removed == [str(folder / "0.jpg")]
    assert changes.modified == [str(folder / "2.jpg"), str(folder / "sub" / "1.jpg")]
    assert changes.describe() == f"1 removed ({folder / '0.jpg'}), 2 modified ({folder / '2.jpg'}, {folder / 'sub' / '1.jpg'})"


def test_the_description_shows_a_few_examples_of_many_changes(folder):
    stored = saved(pool(folder))
    for i in range(10):
        (folder / f"n{i:02d}.jpg").write_bytes(b"n")
    message = inputs_changed(stored, pool(folder), examples=2)
    assert message.endswith(f"10 new ({folder / 'n00.jpg'}, {folder / 'n01.jpg'}, ... 8 more)")


def test_files_the_plan_does_not_read_do_not_count(tmp_path):
    # A folder of tar shards: the plan reads the tars only, not img2dataset's sidecars or hidden files.
    root = tmp_path / "shards"
    root.mkdir()
    for name in ("00000.tar", "00001.tar"):
        with tarfile.open(root / name, "w"):
            pass
    (root / "00000_stats.json").write_text("{}")
    stored = saved(pool(root))
    (root / "00000_stats.json").write_text('{"changed": true}')
    (root / "00000.parquet").write_bytes(b"metadata")
    (root / ".DS_Store").write_bytes(b"junk")
    assert inputs_changed(stored, pool(root)) is None
    with open(root / "00001.tar", "ab") as f:
        f.write(b"\0" * 512)
    assert inputs_changed(stored, pool(root)).endswith(f"1 modified ({root / '00001.tar'})")


def test_single_files_and_globs(tmp_path):
    urls = tmp_path / "urls.txt"
    urls.write_text("http://example.com/a.jpg\n")
    (tmp_path / "part-0.parquet").write_bytes(b"p0")
    specs = [SourceSpec(str(urls), schema.POOL, "pool"), SourceSpec(str(tmp_path / "part-*.parquet"), schema.POOL, "pool")]
    stored = saved(specs)
    assert inputs_changed(stored, specs) is None
    urls.write_text("http://example.com/a.jpg\nhttp://example.com/b.jpg\n")
    (tmp_path / "part-1.parquet").write_bytes(b"p1")
    changes = compare(InputFingerprint.from_dict(stored), fingerprint_inputs(specs))
    assert changes.new == [str(tmp_path / "part-1.parquet")] and changes.modified == [str(urls)]


def test_a_pool_that_is_gone_is_reported_as_removed_files(folder):
    stored = saved(pool(folder))
    for p in sorted(folder.rglob("*.jpg")):
        p.unlink()
    folder.joinpath("sub").rmdir()
    folder.rmdir()
    changes = compare(InputFingerprint.from_dict(stored), fingerprint_inputs(pool(folder)))
    assert len(changes.removed) == 5 and changes.new == changes.modified == []
    assert str(folder) not in changes.removed  # its files are named, not the folder a second time


def test_a_fingerprint_of_another_format_is_refused():
    with pytest.raises(ValueError, match="not an input fingerprint"):
        InputFingerprint.from_dict({"format": "something/2", "roots": {}})
