"""What a run hands to the tools curation teams use: Hugging Face datasets reads the Parquet
output as images (``load_dataset("parquet", ...)`` and ``load_dataset(RUN)``), webdataset
reads the tars, ``curation.open_run`` gives Ray / HF / torch views, the columns follow the
contract (captions and pass-through columns from the inputs), output shards are rebalanced,
the manifest validates against its JSON Schema; and a run without a terminal prints progress
lines, updates status.json inside a stage, and shows none of Ray's misleading lines."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import PROJECT_ROOT, make_jpeg
from tests.helpers import copy_images

SHARD_ROWS = 7
CAPTIONED = 6
TAR_SAMPLES = 4
RAY_NOISE = ("Token authentication is enabled", "core_worker.cc", "The Dataset job will hang", "Starting execution of Dataset",
             "Progress bars disabled", "ray_remote_args")


def write_inputs(root: Path, shared_data: Path) -> list[Path]:
    images = root / "images"
    copy_images(shared_data / "clothing_cc0", images, per_class=2, classes=["hat", "shoes", "skirt", "dress", "shorts"])
    blobs = [make_jpeg(100 + i) for i in range(CAPTIONED)]
    pq.write_table(
        pa.table({
            "image": pa.array(blobs, pa.binary()),
            "caption": [f"a pattern number {i}" for i in range(CAPTIONED)],
            "aesthetic": [0.5 + i for i in range(CAPTIONED)],
            "source_id": [f"src-{i}" for i in range(CAPTIONED)],
        }),
        root / "captioned.parquet",
    )
    with tarfile.open(root / "shard.tar", "w") as tf:
        for i in range(TAR_SAMPLES):
            for name, data in ((f"{i:04d}.jpg", make_jpeg(200 + i)), (f"{i:04d}.txt", f"tar caption {i}".encode()),
                               (f"{i:04d}.json", json.dumps({"url": f"http://example.com/{i}.jpg", "source_id": f"tar-{i}"}).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return [images, root / "captioned.parquet", root / "shard.tar"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data):
    """One `curate run` as CI or a Ray job runs it: no terminal, stderr to a file. status.json is
    read while it runs, as `curate status --run` would."""
    root = tmp_path_factory.mktemp("outputs")
    pools = write_inputs(root, shared_data)
    out = root / "run"
    argv = [sys.executable, "-m", "curation.cli", "run", "--out", str(out), "--config", "smoke", "--progress-interval", "0.05"]
    for p in pools:
        argv += ["--pool", str(p)]
    for item in ("ingest.shard_size=5", f"emit.shard_rows={SHARD_ROWS}", "emit.formats=[parquet, webdataset]",
                 "ingest.extra_columns={aesthetic: float64, source_id: string}"):
        argv += ["--set", item]
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    statuses: list[dict] = []
    with open(root / "stderr.txt", "w") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env)
        while proc.poll() is None:
            try:
                statuses.append(json.loads((out / "status.json").read_text()))
            except (OSError, ValueError):
                pass
            time.sleep(0.02)
    text = (root / "stderr.txt").read_text()
    assert proc.returncode == 0, text[-3000:]
    return out, text, statuses


def rows(out: Path) -> list[dict]:
    m = json.loads((out / "manifest.json").read_text())
    return [r for s in m["shards"] for r in pq.read_table(out / s["path"]).to_pylist()]


def test_output_shards_are_rebalanced_to_the_target_rows(run):
    out, _, _ = run
    m = json.loads((out / "manifest.json").read_text())
    kept = m["counts"]["kept"]
    assert kept == 10 + CAPTIONED + TAR_SAMPLES
    assert [s["rows"] for s in m["shards"]] == [SHARD_ROWS] * (kept // SHARD_ROWS) + ([kept % SHARD_ROWS] if kept % SHARD_ROWS else [])
    assert [s["rows"] for s in m["dataset"]["webdataset_shards"]] == [s["rows"] for s in m["shards"]]
    for s in m["shards"]:  # row groups of at most emit.row_group_rows rows, one schema everywhere
        assert pq.read_schema(out / s["path"]) == pq.read_schema(out / m["shards"][0]["path"])
    keys = [r["key"] for r in rows(out)]
    assert keys == sorted(keys) and len(set(keys)) == kept


def origin(source_key: str) -> str:
    if "::" not in source_key:
        return "folder"
    return "parquet" if source_key.split("::")[0].endswith(".parquet") else "tar"


def test_captions_and_pass_through_columns_come_from_the_inputs(run):
    out, _, _ = run
    by_source: dict[str, list[dict]] = {}
    for r in rows(out):
        by_source.setdefault(origin(r["source_key"]), []).append(r)
    parquet_rows = sorted(by_source["parquet"], key=lambda r: int(r["source_key"].rsplit("::", 1)[1]))
    assert [r["caption"] for r in parquet_rows] == [f"a pattern number {i}" for i in range(CAPTIONED)]
    assert [r["aesthetic"] for r in parquet_rows] == [0.5 + i for i in range(CAPTIONED)]
    tar_rows = sorted(by_source["tar"], key=lambda r: r["source_key"])
    assert [r["caption"] for r in tar_rows] == [f"tar caption {i}" for i in range(TAR_SAMPLES)]
    assert [r["source_id"] for r in tar_rows] == [f"tar-{i}" for i in range(TAR_SAMPLES)]
    assert all(r["url"] == f"http://example.com/{i}.jpg" for i, r in enumerate(tar_rows))
    folder = by_source["folder"]
    assert len(folder) == 10 and all(r["caption"] is None and r["aesthetic"] is None and r["label"] for r in folder)
    assert {r["label"] for r in folder} == {"hat", "shoes", "skirt", "dress", "shorts"}


def test_the_manifest_validates_against_its_json_schema(run):
    jsonschema = pytest.importorskip("jsonschema")
    out, _, _ = run
    schema = json.loads((PROJECT_ROOT / "curation" / "schemas" / "manifest.schema.json").read_text())
    manifest = json.loads((out / "manifest.json").read_text())
    jsonschema.validate(manifest, schema)
    manifest["counts"]["kept"] = -1
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(manifest, schema)


def test_hf_datasets_reads_the_parquet_output_as_images(run, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    out, _, _ = run
    files = sorted(str(p) for p in (out / "dataset").glob("*.parquet"))
    ds = datasets.load_dataset("parquet", data_files=files, split="train")
    assert isinstance(ds.features["image"], datasets.Image)
    assert isinstance(ds[0]["image"], Image.Image) and ds[0]["image"].size == (ds[0]["width"], ds[0]["height"])
    whole = datasets.load_dataset(str(out), split="train")  # the dataset card's configs: not ledger/ or stages/
    assert whole.num_rows == ds.num_rows and whole.column_names == ds.column_names


def test_webdataset_reads_the_tar_output(run):
    out, _, _ = run
    tars = sorted(str(p) for p in (out / "webdataset").glob("*.tar"))
    expected = {r["key"]: r for r in rows(out)}
    try:
        import webdataset as wds

        samples = list(wds.WebDataset(tars, shardshuffle=False))
    except ImportError:  # the format is plain tar: read it as webdataset does, by key
        samples = []
        for t in tars:
            with tarfile.open(t) as tf:
                by_key: dict[str, dict] = {}
                for m in tf.getmembers():
                    key, _, ext = m.name.partition(".")
                    by_key.setdefault(key, {"__key__": key})[ext] = tf.extractfile(m).read()
                samples += list(by_key.values())
    assert sorted(s["__key__"] for s in samples) == sorted(expected)
    for s in samples:
        r = expected[s["__key__"]]
        assert s["jpg"] == r["image"]["bytes"]
        meta = json.loads(s["json"])
        assert meta["sha256"] == r["sha256"] and meta["source_key"] == r["source_key"] and "image" not in meta
        assert (s.get("txt", b"").decode() or None) == r["caption"]


def test_open_run_gives_torch_hf_and_ray_views(run, tmp_path, monkeypatch, ray_local):
    import curation

    out, _, _ = run
    n = len(rows(out))
    pairs = list(curation.open_run(out, "torch"))
    assert len(pairs) == n and pairs[0][0].mode == "RGB" and {"key", "sha256", "caption"} <= set(pairs[0][1])
    assert curation.open_run(out, "ray").count() == n
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    assert curation.open_run(out, "hf").num_rows == n


def test_a_run_without_a_terminal_prints_progress_lines_and_no_ray_noise(run):
    out, err, statuses = run
    lines = err.splitlines()
    assert lines, "no progress at all"
    for stage in ("ingest", "decode", "exact_dedup", "emit"):
        assert any(line.startswith(f"curate: {stage}: started") for line in lines), stage
        assert any(line.startswith(f"curate: {stage}: done,") for line in lines), stage
    assert any(" images/s, ETA " in line for line in lines)  # lines at the interval while a stage runs
    noise = [line for line in lines if any(n in line for n in RAY_NOISE)]
    assert noise == []
    inside = [s["current"] for s in statuses if s.get("current")]  # status.json while stages ran
    assert {c["stage"] for c in inside} >= {"ingest", "decode", "emit"}
    assert any(c["unit"] == "images" and 0 < c["done"] < c["total"] for c in inside)
    final = json.loads((out / "status.json").read_text())
    assert final["state"] == "finished" and final["current"] is None
