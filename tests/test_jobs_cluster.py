"""`curate submit` against a real two-node Ray cluster on 127.0.0.1.

The test starts a head (resource ``head_only``) and a worker (resource ``worker_only``) with
`ray start --block` in their own process groups and a private --temp-dir, with token
authentication on and a token of its own; teardown kills exactly those process groups (never
`ray stop`, which would kill every Ray on the machine). The run must finish through the Jobs
API, use both nodes, match a local run of the same command, and its per-stage metrics must
reach the nodes' Prometheus endpoints.
"""

from __future__ import annotations

import inspect
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import copy_images, dataset_rows, ledger_rows

PROJECT_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CURATE = [sys.executable, "-m", "curation.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_get(url: str, token: str | None = None, timeout: float = 10) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return r.read()


class LocalCluster:
    """A head and a worker node started with `ray start --block`, owned by this object."""

    def __init__(self, root: Path):
        self.root = root
        # Ray's socket paths must stay short, so the temp dir is not under pytest's tmp_path.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rj", dir="/tmp"))
        self.token = secrets.token_hex(32)
        token_file = root / "auth_token"
        token_file.write_text(self.token)
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token_file),
            "RAY_metrics_report_interval_ms": "1000",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
            "KERAS_BACKEND": "torch",
        }
        self.env.pop("RAY_ADDRESS", None)
        self.gcs_port = free_port()
        self.dashboard_port = free_port()
        self.metrics_ports = {"head": free_port(), "worker": free_port()}
        self.procs: dict[str, subprocess.Popen] = {}

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def _node_args(self, name: str) -> list[str]:
        return [
            "--block", "--node-ip-address", "127.0.0.1", "--num-cpus", "1", "--disable-usage-stats",
            "--temp-dir", str(self.temp_dir), "--metrics-export-port", str(self.metrics_ports[name]),
            "--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
            "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
            "--runtime-env-agent-port", str(free_port()), "--object-store-memory", str(200 * 1024**2),
        ]

    def _spawn(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", *args], env=self.env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown kills exactly this tree
        )

    def start(self) -> "LocalCluster":
        self._spawn("head", [
            "--head", "--port", str(self.gcs_port), "--dashboard-host", "127.0.0.1",
            "--dashboard-port", str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
            "--resources", json.dumps({"head_only": 1}), *self._node_args("head"),
        ])
        self._wait(lambda: len(self.nodes()) == 1, "head node")
        self._spawn("worker", [
            "--address", f"127.0.0.1:{self.gcs_port}", "--resources", json.dumps({"worker_only": 1}),
            "--min-worker-port", "0", "--max-worker-port", "0", *self._node_args("worker"),
        ])
        self._wait(lambda: len(self.nodes()) == 2, "worker node")
        return self

    def _wait(self, ready, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs.items():
                if p.poll() is not None:
                    raise RuntimeError(f"ray start ({name}) exited: {(self.root / f'{name}.log').read_text()[-3000:]}")
            try:
                if ready():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"{what} did not come up within {timeout}s")

    def nodes(self) -> list[dict]:
        body = json.loads(http_get(f"{self.address}/api/v0/nodes?limit=100", self.token))
        return [n for n in body["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def tasks(self, job_id: str) -> list[dict]:
        url = f"{self.address}/api/v0/tasks?limit=10000&detail=1&filter_keys=job_id&filter_predicates=%3D&filter_values={job_id}"
        return json.loads(http_get(url, self.token))["data"]["result"]["result"]

    def metrics(self, node: str) -> str:
        return http_get(f"http://127.0.0.1:{self.metrics_ports[node]}/metrics").decode()

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Whatever is left of our process groups (workers, agents) gets SIGKILL.
        for p in self.procs.values():
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalCluster(tmp_path_factory.mktemp("cluster"))
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def small_pool(shared_data, tmp_path_factory) -> Path:
    """40 real images from three Caltech classes plus the dedup fixtures' exact copies."""
    root = tmp_path_factory.mktemp("pool")
    copy_images(shared_data / "pool_caltech101", root, per_class=12, classes=["accordion", "pizza", "umbrella"])
    mixed = shared_data / "imagededup_fixtures" / "mixed_images"
    for name in ("ukbench00120.jpg", "ukbench00120_resize.jpg", "ukbench09268.jpg", "ukbench09268_corrupt.jpg"):
        shutil.copyfile(mixed / name, root / name)
    return root


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """pipelines/smoke.yaml with small shards, so shards spread over both nodes."""
    import yaml

    cfg = yaml.safe_load((PROJECT_ROOT / "pipelines" / "smoke.yaml").read_text())
    cfg["ingest"]["shard_size"] = 8
    cfg.pop("ray", None)
    path = tmp_path_factory.mktemp("cfg") / "smoke-small.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def curate(args: list[str], env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([*CURATE, *args], env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=timeout)


def runner_records_metrics() -> bool:
    import curation.shard_ops

    return "record_stage_shard" in inspect.getsource(curation.shard_ops)


@pytest.mark.slow
def test_submitted_run_uses_both_nodes_matches_local_run_and_exports_metrics(cluster, small_pool, pipeline, tmp_path):
    out = tmp_path / "cluster-run"
    run_args = ["--pool", str(small_pool), "--config", str(pipeline), "--out", str(out)]
    done = curate(["submit", "--address", cluster.address, *run_args], cluster.env)
    assert done.returncode == 0, done.stderr[-3000:] + done.stdout[-3000:]
    job = done.stdout.strip().splitlines()[-1]
    assert job.startswith("curate-smoke-")

    status = curate(["status", job, "--address", cluster.address], cluster.env)
    info = json.loads(status.stdout)
    assert info["status"] == "SUCCEEDED"
    assert info["metadata"]["curation.run_dir"] == str(out)
    assert info["run"]["state"] == "finished"
    # Without the cluster's token the Jobs API refuses, and says what to do.
    no_token = {k: v for k, v in cluster.env.items() if not k.startswith("RAY_AUTH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    refused = curate(["status", job, "--address", cluster.address], no_token)
    assert refused.returncode == 2 and "RAY_AUTH_TOKEN" in refused.stderr, refused.stderr[-2000:]
    logs = curate(["logs", job, "--address", cluster.address], cluster.env)
    assert "input 40 = kept" in logs.stdout

    # Tasks and actors of the job ran on both nodes.
    node_ids = {n["node_id"] for n in cluster.nodes()}
    used = {t["node_id"] for t in cluster.tasks(info["job_id"]) if t.get("node_id")}
    assert used == node_ids, f"tasks ran on {used}, cluster nodes {node_ids}"

    # The same command run locally gives the same dataset and ledger.
    local = tmp_path / "local-run"
    local_env = {k: v for k, v in cluster.env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    ran = curate(["run", *run_args[:-1], str(local)], local_env)
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert dataset_rows(out) == dataset_rows(local)
    assert ledger_rows(out) == ledger_rows(local)
    counts = json.loads((out / "manifest.json").read_text())["counts"]
    assert counts["input"] == 40 and counts["dropped"], counts

    if not runner_records_metrics():
        pytest.xfail("curation/runner.py does not call curation.metrics.record_stage_shard yet")
    text = _wait_for_metric(cluster, ["head", "worker"], 'curation_stage_images_in_total{', timeout=30)
    for stage in ("ingest", "decode", "exact_dedup", "emit"):
        assert f'stage="{stage}"' in text, f"no metrics for stage {stage}"


def _wait_for_metric(cluster: LocalCluster, nodes: list[str], needle: str, timeout: float) -> str:
    deadline = time.time() + timeout
    text = ""
    while time.time() < deadline:
        text = "\n".join(cluster.metrics(n) for n in nodes)
        if needle in text:
            return text
        time.sleep(1)
    raise AssertionError(f"{needle!r} not in the nodes' Prometheus metrics after {timeout}s")


@pytest.mark.slow
def test_metrics_recorded_on_a_worker_node_reach_its_prometheus_endpoint(cluster, tmp_path):
    script = (
        "import ray, time\n"
        "from curation.metrics import record_stage_shard\n"
        "@ray.remote(resources={'worker_only': 1}, num_cpus=0)\n"
        "def shard():\n"
        "    record_stage_shard('probe_stage', {'in': 10, 'out': 7, 'dropped': {'corrupt': 2, 'too_small': 1}, 'seconds': 0.25, 'bytes': 4096})\n"
        "    time.sleep(3)\n"
        "    return ray.get_runtime_context().get_node_id()\n"
        "ray.init()\n"
        "print('NODE', ray.get(shard.remote()))\n"
    )
    (tmp_path / "probe.py").write_text(script)
    from ray.job_submission import JobSubmissionClient

    from curation.jobs import package_dirs

    jobs = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    job = jobs.submit_job(entrypoint="python probe.py", runtime_env={"working_dir": str(tmp_path), "py_modules": package_dirs()})
    deadline = time.time() + 180
    while jobs.get_job_status(job).value not in ("SUCCEEDED", "FAILED", "STOPPED") and time.time() < deadline:
        time.sleep(1)
    assert jobs.get_job_status(job).value == "SUCCEEDED", jobs.get_job_logs(job)
    text = _wait_for_metric(cluster, ["worker"], 'stage="probe_stage"', timeout=30)
    samples = _samples(text, "probe_stage")
    assert samples["curation_stage_images_in_total"] == 10
    assert samples["curation_stage_images_out_total"] == 7
    assert samples['curation_stage_images_dropped_total{reason="corrupt"}'] == 2
    assert samples['curation_stage_images_dropped_total{reason="too_small"}'] == 1
    assert samples["curation_stage_bytes_total"] == 4096
    assert samples["curation_stage_shard_seconds_count"] == 1
    assert "probe_stage" not in cluster.metrics("head")  # recorded where the task ran


def _samples(text: str, stage: str) -> dict[str, float]:
    """Prometheus samples of one stage, keyed by name (without Ray's prefix) and extra tags."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(?:ray_)?(curation_\w+)\{(.*)\} (\S+)$", line)
        if not m or f'stage="{stage}"' not in m.group(2):
            continue
        tags = [t for t in re.findall(r'(\w+="[^"]*")', m.group(2)) if t.startswith("reason=")]
        key = m.group(1) + ("{" + ",".join(tags) + "}" if tags else "")
        out[key] = out.get(key, 0) + float(m.group(3))
    return out


@pytest.mark.slow
def test_stop_ends_a_running_job(cluster):
    from ray.job_submission import JobSubmissionClient

    jobs = JobSubmissionClient(cluster.address, headers={"Authorization": f"Bearer {cluster.token}"})
    job = jobs.submit_job(entrypoint="sleep 300")
    deadline = time.time() + 120
    while jobs.get_job_status(job).value == "PENDING" and time.time() < deadline:
        time.sleep(1)
    stopped = curate(["stop", job, "--address", cluster.address], cluster.env)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    assert json.loads(stopped.stdout) == {"job": job, "stopped": True}
    while jobs.get_job_status(job).value not in ("STOPPED", "FAILED", "SUCCEEDED") and time.time() < deadline:
        time.sleep(1)
    assert jobs.get_job_status(job).value == "STOPPED"
