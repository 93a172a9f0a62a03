"""`curate run` with the deduplication stages on real photos: planted copies are dropped with
reasons pointing at kept representatives; pool copies of an evaluation image are removed."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageOps

from curation.config import PipelineConfig
from curation.runner import RunRequest, run_pipeline
from tests.helpers import copy_images, dataset_rows


DEDUP_REASONS = {"phash_duplicate", "pca_hash_duplicate", "near_duplicate"}


def _save(img: Image.Image, path, quality=90):
    path.parent.mkdir(parents=True, exist_ok=True)
    img.convert("RGB").save(path, "JPEG", quality=quality)


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, ray_local):
    root = tmp_path_factory.mktemp("dedup_e2e")
    pool, evals = root / "pool", root / "eval"
    photos = copy_images(shared_data / "pool_caltech101", pool / "caltech", per_class=4, classes=["accordion", "pizza", "umbrella", "llama", "panda"])
    planted = {}
    for i, src in enumerate(photos[:4]):
        img = Image.open(src).convert("RGB")
        copies = {
            "jpeg": img,
            "half": img.resize((img.width // 2, img.height // 2)),
            "mirror": ImageOps.mirror(img),
        }
        for name, copy in copies.items():
            dst = pool / "copies" / f"{i}_{name}.jpg"
            _save(copy, dst, quality=25 if name == "jpeg" else 90)
            planted[dst.name] = str(src.resolve())
    # An evaluation image whose resized copy sits in the pool.
    eval_src = photos[-1]
    _save(Image.open(eval_src).convert("RGB"), evals / "test" / "eval.jpg", quality=95)
    eval_copy = Image.open(eval_src).convert("RGB")
    _save(eval_copy.resize((eval_copy.width * 3 // 4, eval_copy.height * 3 // 4)), pool / "copies" / "eval_copy.jpg")
    config = PipelineConfig.model_validate(
        {
            "name": "dedup_e2e",
            "ingest": {"shard_size": 10},
            "stages": [
                {"kind": "decode", "min_side": 32},
                {"kind": "exact_dedup"},
                {"kind": "phash"},
                {"kind": "phash_dedup"},
                {"kind": "embed", "name": "pixels_descriptor", "model": {"type": "pixels", "size": 32, "grayscale": True}, "column": "pixels_descriptor", "dtype": "float32"},
                {"kind": "pca_hash", "descriptor": "pixels_descriptor"},
                {"kind": "copy_dedup", "descriptor": "pixels_descriptor", "threshold": 0.95},
                {"kind": "decontaminate", "descriptor": "pixels_descriptor", "threshold": 0.9},
            ],
            "ray": {"num_cpus": 2, "include_dashboard": False},
        }
    )
    out = root / "out"
    run_pipeline(RunRequest(pools=[str(pool)], excludes=[str(evals)], out=out, config=config, progress=False))
    return out, planted, str(eval_src.resolve())


def _ledger(out):
    return [r for p in (out / "ledger").rglob("*.parquet") for r in pq.read_table(p).to_pylist()]


def test_planted_copies_are_dropped_pointing_at_their_original(run):
    out, planted, eval_name = run
    kept = {uid: key for uid, _id, key in dataset_rows(out)}
    by_name = {r["source_key"].rsplit("/", 1)[-1]: r for r in _ledger(out) if r["decision"] == "dropped"}
    for copy_name, original in planted.items():
        row = by_name[copy_name]
        assert row["reason"] in DEDUP_REASONS, (copy_name, row["reason"])
        details = json.loads(row["details"])
        assert details["kept_source_key"] == original
        assert kept[details["kept_uid"]] == details["kept_source_key"]
    assert set(kept.values()) >= set(planted.values())


def test_pool_copy_of_an_evaluation_image_is_decontaminated(run):
    out, _, eval_key = run
    dropped = {r["source_key"]: r for r in _ledger(out) if r["decision"] == "dropped"}
    rows = [r for r in dropped.values() if r["reason"] == "eval_contamination"]
    # The pool original of the evaluation image is contaminated; its resized copy went either
    # the same way or earlier, as a near-duplicate of that original.
    (eval_copy,) = [k for k in dropped if k.endswith("/copies/eval_copy.jpg")]
    assert dropped[eval_key]["reason"] == "eval_contamination"
    assert dropped[eval_copy]["reason"] in DEDUP_REASONS | {"eval_contamination"}
    for r in rows:
        assert json.loads(r["details"])["eval_source_key"].endswith("eval.jpg")
    kept_keys = {key for _u, _i, key in dataset_rows(out)}
    assert eval_copy not in kept_keys and eval_key not in kept_keys


def test_summary_reports_each_dedup_stage(run):
    out, _, _ = run
    manifest = json.loads((out / "manifest.json").read_text())
    text = json.dumps(manifest)
    for stage in ("phash_dedup", "pca_hash", "copy_dedup", "decontaminate"):
        assert stage in text
