"""`curate demo` (the README's first command) works offline and every planted fault of its
generated crawl ends in the ledger with the reason a user would expect."""

from __future__ import annotations

import json

import pyarrow.parquet as pq

from curation.demo import run_demo


def test_demo_runs_and_explains_every_drop(tmp_path, ray_local):
    assert run_demo(tmp_path / "demo") == 0
    run = tmp_path / "demo" / "run"
    m = json.loads((run / "manifest.json").read_text())
    c = m["counts"]
    assert c["input"] == c["kept"] + sum(c["dropped"].values()) and c["kept"] > 0
    fate, details = {}, {}
    for p in (run / "ledger").rglob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            fate.setdefault(r["source_key"].rsplit("/", 1)[-1], []).append(r["reason"])
            details[r["source_key"].rsplit("/", 1)[-1]] = r["details"]

    def reasons(name):
        return set(fate[name])

    assert reasons("missing-1.jpg") == {"http_404"}
    assert reasons("500.jpg") == {"http_500"}
    assert reasons("passwd") == {"bad_url"} and reasons("x.jpg") == {"bad_url"}
    assert reasons("page.html") == {"not_image"}
    assert reasons("empty.jpg") == {"zero_bytes"} and reasons("zero.jpg") == {"zero_bytes"}
    assert reasons("truncated.jpg") == {"truncated"}
    assert reasons("corrupt.jpg") <= {"corrupt", "truncated"}
    assert reasons("tiny.png") == {"too_small"} and reasons("banner.png") == {"extreme_aspect"}
    assert reasons("notes.txt") == {"not_image"}
    for i in range(10):  # planted copies: byte-identical, and resized + re-encoded
        assert reasons(f"copy_{i}.jpg") == {"exact_duplicate"}
        assert reasons(f"resized_{i}.jpg") <= {"phash_duplicate", "local_copy_duplicate"}
    for i in (30, 36, 39, 45):  # crops: found by local features, with their original named
        assert reasons(f"crop_{i}.jpg") == {"local_copy_duplicate"}
        assert json.loads(details[f"crop_{i}.jpg"])["kept_source_key"].endswith(f"img_{i:04d}.jpg")
    # The same URL listed twice is fetched twice and deduplicated by content.
    assert len(fate["img_0000.jpg"]) == 2 and "exact_duplicate" in fate["img_0000.jpg"]
    assert m["stage_reports"]["nsfw"]["applied"] is False
    assert any("NSFW filtering was NOT applied" in w for w in m["warnings"])
    assert m["seeds"]["seeds"]["as_is_kept"] == 40
