"""`curate run` over every kind of crawl input at once: a URL list fetched from a real HTTP
server on 127.0.0.1, WebDataset tar shards, and Parquet with image bytes. Each failure is a
ledger reason; nothing is lost."""

from __future__ import annotations

import io
import json
import tarfile

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.runner import RunRequest, run_pipeline
from tests.helpers import manifest
from tests.http_fixtures import LOOPBACK_HTTP, ImageServer


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_local):
    root = tmp_path_factory.mktemp("sources")
    with ImageServer(n_images=6) as server:
        urls = [server.url(f"/img/{i}.jpg") for i in range(4)]
        urls += [
            server.url("/status/404"),
            server.url("/flaky/t1/1/4.jpg"),  # 500 once, then the image
            server.url("/html"),
            server.url("/truncated"),
            server.url("/loop"),
            server.url("/big/30000000"),
            "file:///etc/passwd",
        ]
        (root / "urls.txt").write_text("\n".join(urls) + "\n")
        with tarfile.open(root / "shard-00000.tar", "w") as tar:
            for i in range(3):
                add(tar, f"{i:05d}.jpg", server.image(i + 1))  # copies of fetched images
                add(tar, f"{i:05d}.json", json.dumps({"url": f"http://example.com/{i}.jpg"}).encode())
            add(tar, "../escape.jpg", server.image(5))
        pq.write_table(pa.table({"image": pa.array([server.image(5), b"", b"not an image"], pa.binary())}), root / "rows.parquet")
        cfg = load_config("smoke", overrides={"ingest": {"http": {"retries": 2, "backoff": 0.01, "read_timeout": 5, **LOOPBACK_HTTP}}})
        out = root / "out"
        run_pipeline(RunRequest(pools=[str(root / "urls.txt"), str(root / "shard-00000.tar"), str(root / "rows.parquet")], out=out, config=cfg))
    return out


def reasons_by_key(run_dir):
    out = {}
    for p in (run_dir / "ledger").rglob("*.parquet"):
        for r in pq.read_table(p).to_pylist():
            out[r["source_key"]] = r
    return out


def test_counts_balance_across_source_kinds(run):
    c = manifest(run)["counts"]
    assert c["input"] == 11 + 4 + 3
    assert c["input"] == c["kept"] + sum(c["dropped"].values())


def test_each_fault_has_its_reason(run):
    by_key = reasons_by_key(run)
    def reason(fragment):
        (r,) = [v for k, v in by_key.items() if fragment in k]
        return r["reason"]
    assert reason("/status/404") == "http_404"
    assert reason("/flaky/t1") is None  # retried after the 500 and kept
    assert reason("/html") == "not_image"
    assert reason("/truncated") == "truncated_download"
    assert reason("/loop") == "too_many_redirects"
    assert reason("/big/") == "too_large"
    assert reason("file:///etc/passwd") == "bad_url"
    assert reason("../escape.jpg") == "unsafe_member"


def test_duplicates_across_source_kinds_are_found(run):
    dups = [r for r in reasons_by_key(run).values() if r["reason"] == "exact_duplicate"]
    # three tar members copy fetched images; the Parquet row copies the tar's escaped member
    # (which was rejected), so it is not a duplicate of anything kept
    assert len(dups) == 3
    assert all(".tar::" in d["source_key"] for d in dups)
