"""Partitioned global stages inside a real ``curate run`` on Ray, on real photos: the same
dataset and ledger as the single-task run, also after a SIGKILL in the middle of a
partitioned stage and a resume (which redoes only the tasks that had not finished)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import yaml

from tests.helpers import copy_images, dataset_rows, ledger_rows
from tests.test_resume import curate_run, wait_for

STAGES = [
    {"kind": "decode", "min_side": 32},
    {"kind": "exact_dedup"},
    {"kind": "phash"},
    {"kind": "phash_dedup", "radius": 8},
    {"kind": "embed", "name": "pixels", "model": {"type": "pixels", "size": 16, "grayscale": True}, "column": "pixels_descriptor", "dtype": "float32"},
    {"kind": "pca_hash", "descriptor": "pixels_descriptor", "radius": 4},
    {"kind": "copy_dedup", "descriptor": "pixels_descriptor", "threshold": 0.9, "index": {"list_size": 20, "list_probe": 100}},
]


def pipeline(path: Path, form: str) -> Path:
    cfg = {
        "ingest": {"shard_size": 10},
        "stages": STAGES,
        "execution": {"global_stages": form, "max_partition_rows": 25, "map_task_rows": 20},
        "ray": {"num_cpus": 2, "include_dashboard": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def pool_and_reference(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("partitioned")
    pool = root / "pool"
    images = copy_images(shared_data / "pool_caltech101", pool, per_class=5, classes=["accordion", "pizza", "umbrella", "llama", "panda", "dalmatian", "ferry", "laptop"])
    from PIL import Image, ImageOps

    for i, src in enumerate(images[:8]):  # planted copies: exact, mirrored, re-encoded
        (pool / f"exact{i}.jpg").write_bytes(src.read_bytes())
        img = Image.open(src).convert("RGB")
        ImageOps.mirror(img).save(pool / f"mirror{i}.jpg", quality=90)
        img.save(pool / f"reencoded{i}.jpg", quality=60)
    reference = root / "single"
    proc = curate_run(pool, reference, pipeline(root / "single.yaml", "single_task"))
    assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-3000:]
    return root, pool, reference


def test_partitioned_run_killed_inside_a_partitioned_stage_resumes_to_the_single_task_output(pool_and_reference, tmp_path):
    root, pool, reference = pool_and_reference
    out = tmp_path / "killed"
    config = pipeline(tmp_path / "p.yaml", "partitioned")
    proc = curate_run(pool, out, config)
    wait_for("stages/07_copy_dedup/steps/search/task-*.json", out, proc, timeout=500)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it was killed"
    done_before = {p.name for p in (out / "stages" / "07_copy_dedup" / "steps" / "search").glob("task-*.json")}
    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "stages" / "07_copy_dedup" / "steps" / "search").glob("task-*.json")}
    again = curate_run(pool, out, config)
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-3000:]
    assert dataset_rows(out) == dataset_rows(reference)
    assert ledger_rows(out) == ledger_rows(reference)
    for name in done_before:  # finished partitions were not redone
        assert (out / "stages" / "07_copy_dedup" / "steps" / "search" / name).stat().st_mtime_ns == mtimes[name]
    assert {"exact_duplicate", "phash_duplicate"} <= {r[4] for r in ledger_rows(out)}
    for stage in ("02_exact_dedup", "04_phash_dedup", "06_pca_hash", "07_copy_dedup"):  # all partitioned
        assert (out / "stages" / stage / "steps" / "_plan.json").exists(), stage
