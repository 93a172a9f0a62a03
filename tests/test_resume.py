"""A run killed at any point and started again ends with the same output as an uninterrupted one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import copy_images, dataset_rows, ledger_rows

PROJECT = Path(__file__).resolve().parents[1]


def curate_run(pool: Path, out: Path, config: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    return subprocess.Popen(
        [sys.executable, "-m", "curation.cli", "run", "--pool", str(pool), "--out", str(out), "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, start_new_session=True,
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("resume")
    pool = root / "pool"
    copy_images(shared_data / "pool_caltech101", pool, per_class=4, classes=["accordion", "pizza", "umbrella", "llama", "panda", "dalmatian"])
    (pool / "dup.jpg").write_bytes(next((pool / "pizza").iterdir()).read_bytes())
    config = root / "pipeline.yaml"
    config.write_text(
        "ingest: {shard_size: 3}\n"
        "stages: [{kind: decode, min_side: 32}, {kind: exact_dedup}]\n"
        "emit: {shard_rows: 4}\n"
        "ray: {num_cpus: 2, include_dashboard: false}\n"
    )
    reference = root / "reference"
    proc = curate_run(pool, reference, config)
    assert proc.wait(timeout=300) == 0, proc.stderr.read().decode()[-3000:]
    return pool, config, reference


def wait_for(pattern: str, run_dir: Path, proc: subprocess.Popen, timeout=240) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if list(run_dir.glob(pattern)):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before {pattern} appeared: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.02)
    pytest.fail(f"{pattern} never appeared")


@pytest.mark.parametrize("kill_when", [
    "stages/00_ingest/part-00002.done",
    # a map stage killed at random points: tests/test_chaos.py (its default case kills a global stage)
    pytest.param("stages/01_decode/part-00001.done", marks=pytest.mark.slow),
    # emit writes its output shards (4 rows each here) one task each, marker after the files
    pytest.param("stages/03_emit/output/part-00000.done", marks=pytest.mark.slow),
])
def test_killed_run_resumes_to_identical_output(setup, tmp_path, kill_when):
    pool, config, reference = setup
    out = tmp_path / "run"
    proc = curate_run(pool, out, config)
    wait_for(kill_when, out, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run finished before it was killed"
    again = curate_run(pool, out, config)
    assert again.wait(timeout=300) == 0, again.stderr.read().decode()[-3000:]
    assert dataset_rows(out) == dataset_rows(reference)
    assert ledger_rows(out) == ledger_rows(reference)
    for ref in sorted((reference / "dataset").glob("*.parquet")):
        assert (out / "dataset" / ref.name).read_bytes() == ref.read_bytes()
