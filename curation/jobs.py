"""``curate submit/status/logs/stop``: the same ``curate run`` sent to a Ray cluster as a Ray job.

The job runs ``python -m curation.cli run ...`` on the cluster's head node. The code of the
``curation``, ``embedders`` and ``retrieval`` packages travels with the job as ``py_modules``
(so the cluster runs exactly the submitter's version of the pipeline) and the pipeline YAML
travels in a small ``working_dir``; third-party dependencies must already be installed in the
cluster's image (see deploy/Dockerfile). The run directory is written *by the cluster*: it must
be an absolute path on storage every node mounts at the same place (NFS, a PVC, ...).

Clusters started with token authentication (Ray >= 2.52 enables it by default for local
clusters) need the token: it is read from ``RAY_AUTH_TOKEN``, the file ``RAY_AUTH_TOKEN_PATH``
or ``~/.ray/auth_token``, and sent only to ``--address``.
"""

from __future__ import annotations

import asyncio
import getpass
import importlib.util
import json
import os
import secrets
import shlex
import shutil
import socket
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from curation.runner import RunError

# Packages shipped with every job; their third-party imports must be installed on the cluster.
SHIPPED_PACKAGES = ("curation", "embedders", "retrieval")
CONFIG_DIR = "pipeline"  # inside the job's working_dir
METADATA_PREFIX = "curation."
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


class JobError(RunError):
    """A submission that cannot be made, or a job that did not succeed (the CLI prints it)."""


@dataclass(frozen=True)
class Submission:
    """Everything sent to the Jobs API for one run (built without contacting the cluster)."""

    entrypoint: str
    runtime_env: dict[str, Any]
    metadata: dict[str, str]
    submission_id: str
    config_file: Path  # local file copied into the working_dir as CONFIG_DIR/<name>


# ---------------------------------------------------------------------------------------------
# Building a submission
# ---------------------------------------------------------------------------------------------
def _cluster_path(arg: str, what: str) -> str:
    """A path as the cluster must see it. A path that exists here becomes absolute (it must be
    shared storage mounted at the same place on the cluster); anything else (a catalog name, or
    a path that exists only on the cluster) is passed through, but must not be relative."""
    p = Path(arg)
    if p.exists():
        return str(p.resolve())
    if os.sep in arg and not p.is_absolute():
        raise JobError(f"{what} {arg!r} is a relative path that does not exist here; give an absolute path as the cluster sees it")
    return arg


def package_dirs() -> list[str]:
    dirs = []
    for name in SHIPPED_PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise JobError(f"cannot ship package {name!r}: it is not importable here")
        dirs.append(str(Path(list(spec.submodule_search_locations)[0]).resolve()))
    return dirs


def build_submission(args) -> Submission:
    """Validate the run options locally (the pipeline YAML is loaded, so a broken config fails
    here rather than on the cluster) and describe the Ray job."""
    from curation.config import load_config, resolve_pipeline_path

    config_file = resolve_pipeline_path(args.config).resolve()
    sets = list(getattr(args, "set", None) or [])
    cfg = load_config(config_file, sets=sets)
    out = str(args.out)
    if not Path(out).is_absolute():
        raise JobError(
            f"--out {out!r} must be an absolute path on storage that every node of the cluster "
            "mounts at the same place (e.g. /mnt/runs/crawl-2024-06); the job writes it there"
        )
    pools = [_cluster_path(p, "--pool") for p in args.pool]
    seeds = [_cluster_path(s, "--seeds") for s in (args.seeds or [])]
    excludes = [_cluster_path(e, "--exclude") for e in (args.exclude or [])]
    argv = ["python", "-m", "curation.cli", "run"]
    for flag, values in (("--pool", pools), ("--seeds", seeds), ("--exclude", excludes)):
        for v in values:
            argv += [flag, v]
    argv += ["--out", out, "--config", f"{CONFIG_DIR}/{config_file.name}"]
    for item in sets:
        argv += ["--set", item]
    for flag in ("allow_missing_weights", "fetch_weights", "trust_on_first_use", "replan"):
        if getattr(args, flag, False):
            argv.append("--" + flag.replace("_", "-"))
    if getattr(args, "progress_interval", 30.0) != 30.0:  # a job's log is no terminal: progress lines
        argv += ["--progress-interval", str(args.progress_interval)]
    fingerprint = cfg.fingerprint()
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    submission_id = f"curate-{_slug(cfg.name)}-{fingerprint[:8]}-{stamp}-{secrets.token_hex(2)}"
    metadata = {
        f"{METADATA_PREFIX}run_dir": out,
        f"{METADATA_PREFIX}pipeline": cfg.name,
        f"{METADATA_PREFIX}config_file": config_file.name,
        f"{METADATA_PREFIX}config_fingerprint": fingerprint,
        f"{METADATA_PREFIX}pools": json.dumps(pools),
        f"{METADATA_PREFIX}seeds": json.dumps(seeds),
        f"{METADATA_PREFIX}excludes": json.dumps(excludes),
        f"{METADATA_PREFIX}submitted_by": f"{_user()}@{socket.gethostname()}",
    }
    runtime_env = {
        "py_modules": package_dirs(),
        "excludes": ["__pycache__", "*.pyc"],
        "env_vars": {"KERAS_BACKEND": "torch", "PYTHONUNBUFFERED": "1"},
    }
    return Submission(shlex.join(argv), runtime_env, metadata, submission_id, config_file)


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-") or "run"


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no passwd entry in some containers
        return "unknown"


# ---------------------------------------------------------------------------------------------
# Talking to the cluster
# ---------------------------------------------------------------------------------------------
def auth_token() -> str | None:
    """The Ray auth token this client holds, or None (then no header is sent)."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
    if path.is_file():
        return path.read_text().strip() or None
    return None


@contextmanager
def api_errors(address: str):
    """Turn the Jobs API's connection and authentication failures into one-line JobErrors."""
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as e:
        first = str(e).strip().splitlines()[0]
        raise JobError(
            f"the Ray cluster at {address} refused the request ({first}); give its token in "
            "RAY_AUTH_TOKEN, or a file holding it in RAY_AUTH_TOKEN_PATH (default ~/.ray/auth_token)"
        ) from None
    except (ConnectionError, RuntimeError) as e:
        raise JobError(f"cannot reach the Ray Jobs API at {address}: {e}") from None


def client(address: str):
    """A Jobs API client for a dashboard URL such as http://127.0.0.1:8265."""
    from ray.job_submission import JobSubmissionClient

    if not address:
        raise JobError("give the cluster's dashboard address with --address (e.g. http://127.0.0.1:8265)")
    token = auth_token()
    headers = {"Authorization": f"Bearer {token}"} if token else None
    with api_errors(address):
        return JobSubmissionClient(address, headers=headers)


def submit_run(args) -> str:
    """Submit the run; unless ``--no-wait``, stream its logs and fail if the job fails."""
    sub = build_submission(args)
    jobs = client(args.address)
    with tempfile.TemporaryDirectory(prefix="curate-submit-") as tmp:
        workdir = Path(tmp)
        (workdir / CONFIG_DIR).mkdir()
        shutil.copyfile(sub.config_file, workdir / CONFIG_DIR / sub.config_file.name)
        with api_errors(args.address):
            job_id = jobs.submit_job(
                entrypoint=sub.entrypoint,
                runtime_env={**sub.runtime_env, "working_dir": str(workdir)},
                metadata=sub.metadata,
                submission_id=sub.submission_id,
            )
    print(f"submitted job {job_id}; run directory {sub.metadata[METADATA_PREFIX + 'run_dir']} (on the cluster)", file=sys.stderr)
    if getattr(args, "no_wait", False):
        return job_id
    try:
        with api_errors(args.address):
            status = _follow(jobs, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running. `curate stop {job_id} --address {args.address}` ends it.", file=sys.stderr)
        return job_id
    if status != "SUCCEEDED":
        info = jobs.get_job_info(job_id)
        raise JobError(f"job {job_id} ended {status}: {info.message or ''}".strip())
    return job_id


def _follow(jobs, job_id: str) -> str:
    async def tail() -> None:
        async for chunk in jobs.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    asyncio.run(tail())
    # The log stream ends when the job does; the status may lag by a moment.
    for _ in range(60):
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(0.5)
    return status


def job_status(job_id: str, address: str) -> dict:
    """The job's state and metadata, plus the run's status.json when the run directory is
    readable from here (shared storage)."""
    with api_errors(address):
        info = client(address).get_job_info(job_id)
    out: dict[str, Any] = {
        "job": job_id,
        "submission_id": info.submission_id,
        "job_id": info.job_id,
        "status": str(info.status.value),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata or {},
    }
    run_dir = (info.metadata or {}).get(f"{METADATA_PREFIX}run_dir")
    if run_dir and (Path(run_dir) / "status.json").is_file():
        from curation.run_state import run_state

        state = run_state(run_dir)
        run = state["status"]
        out["run"] = {
            "state": state["state"],  # "interrupted" when status.json says running but its holder is gone
            "updated": run.get("updated"),
            "stage": run.get("stage"),
            "stages_done": run.get("stages_done", []),
            **({"error": run["error"]} if run.get("error") else {}),
            "held_by": state["holder"] if state["in_progress"] else None,
        }
    return out


def job_logs(job_id: str, address: str, follow: bool = False) -> None:
    jobs = client(address)
    with api_errors(address):
        if follow:
            _follow(jobs, job_id)
        else:
            sys.stdout.write(jobs.get_job_logs(job_id))
            sys.stdout.flush()


def stop_job(job_id: str, address: str) -> bool:
    """Ask the cluster to stop the job; False if it had already ended."""
    with api_errors(address):
        return bool(client(address).stop_job(job_id))
