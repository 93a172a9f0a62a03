"""`curate submit`: what is sent to the Ray Jobs API, checked without a cluster.

The job must run the same `curate run` command a user would type, carry the submitter's code
(py_modules) and pipeline file (working_dir), and be recognisable on the dashboard by its
metadata. The real two-node cluster test is tests/test_jobs_cluster.py (slow).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

from curation import jobs
from curation.cli import build_parser, main
from curation.config import load_config

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def submit_args(*extra: str):
    return build_parser().parse_args(["submit", "--address", "http://127.0.0.1:9", *extra])


@pytest.fixture
def inputs(tmp_path):
    pool, seeds = tmp_path / "pool", tmp_path / "seeds"
    pool.mkdir()
    seeds.mkdir()
    return pool, seeds


def test_entrypoint_is_curate_run_with_absolute_paths_and_the_shipped_config(inputs, tmp_path, monkeypatch):
    pool, seeds = inputs
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "runs" / "r1"
    sub = jobs.build_submission(submit_args("--pool", "pool", "--seeds", "seeds", "--exclude", "imagenet1k_val", "--out", str(out), "--config", "smoke", "--allow-missing-weights",
                                            "--set", "stages.decode.min_side=16"))
    argv = shlex.split(sub.entrypoint)
    assert argv[:4] == ["python", "-m", "curation.cli", "run"]
    run = build_parser().parse_args(argv[3:])  # the job's command line is a valid `curate run`
    assert run.pool == [str(pool)] and run.seeds == [str(seeds)]
    assert run.exclude == ["imagenet1k_val"]  # a catalog name passes through
    assert run.out == str(out)
    assert run.config == "pipeline/smoke.yaml" and sub.config_file == PROJECT_ROOT / "pipelines" / "smoke.yaml"
    assert run.allow_missing_weights is True and run.replan is False
    assert run.set == ["stages.decode.min_side=16"]  # overrides travel with the job (and were validated here)
    replan = jobs.build_submission(submit_args("--pool", "pool", "--out", str(out), "--config", "smoke", "--replan"))
    assert build_parser().parse_args(shlex.split(replan.entrypoint)[3:]).replan is True


def test_runtime_env_ships_the_three_packages_without_bytecode(inputs, tmp_path):
    pool, _ = inputs
    sub = jobs.build_submission(submit_args("--pool", str(pool), "--out", str(tmp_path / "o"), "--config", "smoke"))
    mods = [Path(p) for p in sub.runtime_env["py_modules"]]
    assert [m.name for m in mods] == ["curation", "embedders", "retrieval"]
    assert all((m / "__init__.py").is_file() for m in mods)
    assert mods[0] == PROJECT_ROOT / "curation"
    assert "__pycache__" in sub.runtime_env["excludes"]
    assert sub.runtime_env["env_vars"]["KERAS_BACKEND"] == "torch"
    assert "working_dir" not in sub.runtime_env  # added at submission, holding the config


def test_metadata_tells_runs_apart_on_the_dashboard(inputs, tmp_path):
    pool, seeds = inputs
    a = jobs.build_submission(submit_args("--pool", str(pool), "--seeds", str(seeds), "--out", str(tmp_path / "a"), "--config", "smoke"))
    other = tmp_path / "other.yaml"
    other.write_text((PROJECT_ROOT / "pipelines" / "smoke.yaml").read_text() + "\nseed: 7\n")
    b = jobs.build_submission(submit_args("--pool", str(pool), "--out", str(tmp_path / "b"), "--config", str(other)))
    assert all(isinstance(v, str) for v in a.metadata.values())  # the Jobs API takes str -> str
    assert a.metadata["curation.run_dir"] == str(tmp_path / "a")
    assert a.metadata["curation.config_fingerprint"] == load_config("smoke").fingerprint()
    assert b.metadata["curation.config_fingerprint"] == load_config(other).fingerprint() != a.metadata["curation.config_fingerprint"]
    assert json.loads(a.metadata["curation.seeds"]) == [str(seeds)] and json.loads(b.metadata["curation.seeds"]) == []
    assert a.submission_id.startswith("curate-smoke-" + a.metadata["curation.config_fingerprint"][:8])
    assert a.submission_id != jobs.build_submission(submit_args("--pool", str(pool), "--out", str(tmp_path / "a"), "--config", "smoke")).submission_id


def test_relative_run_dir_is_refused_because_the_cluster_writes_it(inputs):
    pool, _ = inputs
    with pytest.raises(jobs.JobError, match="absolute path on storage that every node"):
        jobs.build_submission(submit_args("--pool", str(pool), "--out", "runs/latest", "--config", "smoke"))


def test_relative_input_that_does_not_exist_here_is_refused(tmp_path):
    with pytest.raises(jobs.JobError, match="relative path"):
        jobs.build_submission(submit_args("--pool", "data/crawl", "--out", str(tmp_path / "o"), "--config", "smoke"))


def test_broken_pipeline_fails_before_anything_is_sent(inputs, tmp_path, capsys):
    pool, _ = inputs
    bad = tmp_path / "bad.yaml"
    bad.write_text("stages:\n  - kind: no_such_stage\n")
    rc = main(["submit", "--address", "http://127.0.0.1:9", "--pool", str(pool), "--out", str(tmp_path / "o"), "--config", str(bad)])
    assert rc == 2
    assert "no_such_stage" in capsys.readouterr().err


class RecordingClient:
    """Stands in for JobSubmissionClient; records the call and what the working_dir held."""

    def __init__(self):
        self.calls = []

    def submit_job(self, **kwargs):
        wd = Path(kwargs["runtime_env"]["working_dir"])
        self.calls.append({**kwargs, "files": sorted(str(p.relative_to(wd)) for p in wd.rglob("*") if p.is_file())})
        return kwargs["submission_id"]


def test_submit_sends_the_config_in_the_working_dir_and_prints_the_job_id(inputs, tmp_path, monkeypatch, capsys):
    pool, _ = inputs
    rec = RecordingClient()
    monkeypatch.setattr(jobs, "client", lambda address: rec)
    rc = main(["submit", "--address", "http://127.0.0.1:9", "--pool", str(pool), "--out", str(tmp_path / "o"), "--config", "smoke", "--no-wait"])
    assert rc == 0
    (call,) = rec.calls
    assert call["files"] == ["pipeline/smoke.yaml"]
    assert not Path(call["runtime_env"]["working_dir"]).exists()  # temporary, removed after upload
    assert capsys.readouterr().out.strip() == call["submission_id"]


def test_unreachable_cluster_is_a_clear_error(inputs, tmp_path, capsys):
    pool, _ = inputs
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    rc = main(["submit", "--address", f"http://127.0.0.1:{port}", "--pool", str(pool), "--out", str(tmp_path / "o"), "--config", "smoke", "--no-wait"])
    assert rc == 2
    assert f"cannot reach the Ray Jobs API at http://127.0.0.1:{port}" in capsys.readouterr().err


def test_auth_token_sources_in_ray_precedence(tmp_path, monkeypatch):
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert jobs.auth_token() is None
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert jobs.auth_token() == "from-home"
    path = tmp_path / "tok"
    path.write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert jobs.auth_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert jobs.auth_token() == "from-env"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert jobs.auth_token() is None
