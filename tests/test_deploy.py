"""deploy/: every file parses, and the fields a working, locked-down deployment depends on hold.

Kubernetes built-in kinds (and every pod template inside the KubeRay resources, wrapped as a
PodTemplate) are validated against the Kubernetes OpenAPI schemas with `kubernetes-validate`
when it is installed; the KubeRay CRDs themselves are checked field by field here.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
KUBERAY = DEPLOY / "kuberay"
IMAGE = "curation:0.1.0"
PVC = "curation-data"
LABEL = {"app.kubernetes.io/part-of": "curation"}


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def all_k8s_docs() -> list[dict]:
    return [d for p in sorted(KUBERAY.glob("*.yaml")) for d in docs(p)]


def one(kind: str) -> dict:
    found = [d for d in all_k8s_docs() if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def cluster_specs() -> dict[str, dict]:
    return {"RayCluster": one("RayCluster")["spec"], "RayJob": one("RayJob")["spec"]["rayClusterSpec"]}


def pod_templates(spec: dict) -> dict[str, dict]:
    out = {"head": spec["headGroupSpec"]["template"]}
    for g in spec["workerGroupSpecs"]:
        out[g["groupName"]] = g["template"]
    return out


def test_every_deploy_yaml_parses_and_kubernetes_files_name_their_kind():
    files = sorted(DEPLOY.rglob("*.yaml"))
    assert {p.name for p in files} >= {"raycluster.yaml", "rayjob.yaml", "storage.yaml", "networkpolicy.yaml", "cluster-launcher.yaml"}
    for p in files:
        assert docs(p), f"{p} is empty"
    for d in all_k8s_docs():
        assert d["apiVersion"] and d["kind"] and d["metadata"]["name"]


def test_rayjob_entrypoint_is_curate_run_with_a_run_dir_on_the_shared_volume():
    spec = one("RayJob")["spec"]
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["curate", "run"]
    out = argv[argv.index("--out") + 1]
    assert out.startswith("/data/"), "the run directory must be on the shared volume mounted at /data"
    assert spec["metadata"]["curation.run_dir"] == out
    config = argv[argv.index("--config") + 1]
    # The image copies pipelines/ to /opt/curation (deploy/Dockerfile).
    assert config.startswith("/opt/curation/pipelines/") and (DEPLOY.parent / "pipelines" / Path(config).name).is_file()
    assert spec["shutdownAfterJobFinishes"] is True


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_cpu_and_gpu_worker_groups_with_gpus_only_on_the_gpu_group(owner):
    spec = cluster_specs()[owner]
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-workers", "gpu-workers"}
    for name, g in groups.items():
        res = g["template"]["spec"]["containers"][0]["resources"]
        gpus = res["limits"].get("nvidia.com/gpu")
        if name == "gpu-workers":
            assert gpus and int(gpus) >= 1 and res["requests"]["nvidia.com/gpu"] == gpus
            tolerations = g["template"]["spec"]["tolerations"]
            assert any(t["key"] == "nvidia.com/gpu" for t in tolerations)
        else:
            assert gpus is None
        assert 0 <= g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
    head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in head["limits"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_every_ray_pod_mounts_the_shared_run_volume_and_uses_the_project_image(owner):
    for group, tmpl in pod_templates(cluster_specs()[owner]).items():
        pod = tmpl["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        claim_volume = [n for n, v in volumes.items() if v.get("persistentVolumeClaim", {}).get("claimName") == PVC]
        assert claim_volume, f"{owner}/{group} does not use the PVC {PVC}"
        container = pod["containers"][0]
        mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
        assert mounts.get(claim_volume[0]) == "/data", f"{owner}/{group} does not mount the runs volume at /data"
        assert container["image"] == IMAGE
        assert tmpl["metadata"]["labels"].items() >= LABEL.items(), "the NetworkPolicy selects pods by this label"


def test_shared_volume_is_read_write_many():
    pvc = one("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == PVC
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_dashboard_is_not_exposed_outside_the_cluster_and_token_auth_is_on(owner):
    spec = cluster_specs()[owner]
    assert spec["headGroupSpec"].get("serviceType", "ClusterIP") == "ClusterIP"
    assert spec["authOptions"]["mode"] == "token"
    assert tuple(int(x) for x in spec["rayVersion"].split(".")[:2]) >= (2, 52), "token auth needs Ray >= 2.52"
    kinds = {d["kind"] for d in all_k8s_docs()}
    assert "Ingress" not in kinds and "Route" not in kinds
    for d in all_k8s_docs():
        if d["kind"] == "Service":
            assert d["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_network_policy_limits_ingress_to_ray_pods_operator_and_prometheus():
    pol = one("NetworkPolicy")["spec"]
    assert pol["podSelector"]["matchLabels"] == LABEL
    assert pol["policyTypes"] == ["Ingress"]
    rules = pol["ingress"]
    unrestricted = [r for r in rules if "ports" not in r]
    assert len(unrestricted) == 1 and unrestricted[0]["from"] == [{"podSelector": {"matchLabels": LABEL}}]
    ports = sorted(p["port"] for r in rules for p in r.get("ports", []))
    assert ports == [8080, 8265]
    for r in rules:
        for peer in r["from"]:
            assert "ipBlock" not in peer, "no address range outside the cluster may reach Ray"


def test_cluster_launcher_has_cpu_and_gpu_nodes_loopback_dashboard_and_shared_storage():
    cfg = docs(DEPLOY / "cluster-launcher.yaml")[0]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    assert types["gpu_worker"]["resources"]["GPU"] >= 1
    assert "GPU" not in types["cpu_worker"]["resources"]
    assert "--gpus all" in types["gpu_worker"]["docker"]["worker_run_options"]
    head_start = " ".join(cfg["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert cfg["docker"]["image"] == IMAGE
    assert "-v /mnt/efs:/data" in cfg["docker"]["run_options"]
    assert any("mount -t nfs4" in c and "/mnt/efs" in c for c in cfg["initialization_commands"])
    assert "-e RAY_AUTH_MODE=token" in cfg["docker"]["run_options"]


def test_dockerfile_installs_the_project_and_the_no_deps_safety_packages():
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.1[0-9]", text, re.M)
    assert "pip install ." in text
    assert "pip install --no-deps facenet-pytorch==2.6.0 opennsfw2==0.19.0" in text
    for pkg in ("curation", "embedders", "retrieval", "pipelines"):
        assert re.search(rf"^COPY {pkg} \./{pkg}$", text, re.M), f"the image must contain {pkg}/"
    assert re.search(r"^USER ray$", text, re.M), "the image must not run as root"
    assert f"-t {IMAGE}" in text


def test_readme_documents_every_value_a_deployment_changes():
    readme = (DEPLOY / "README.md").read_text()
    for value in (IMAGE, PVC, "nvidia.com/gpu", "storageClassName", "kuberay-system", "monitoring", "fs-0123456789abcdef0", "RAY_AUTH_TOKEN", "port-forward"):
        assert value in readme, f"deploy/README.md does not mention {value}"


def _kubernetes_validate():
    return pytest.importorskip("kubernetes_validate", reason="kubernetes-validate not installed (pip install kubernetes-validate)")


def test_builtin_kinds_validate_against_the_kubernetes_schemas():
    kv = _kubernetes_validate()
    builtin = [d for d in all_k8s_docs() if not d["apiVersion"].startswith("ray.io/")]
    assert {d["kind"] for d in builtin} == {"PersistentVolumeClaim", "NetworkPolicy"}
    for d in builtin:
        kv.validate(d, kv.latest_version(), strict=True)


@pytest.mark.parametrize("owner", ["RayCluster", "RayJob"])
def test_ray_pod_templates_validate_as_kubernetes_pod_templates(owner):
    kv = _kubernetes_validate()
    for group, tmpl in pod_templates(cluster_specs()[owner]).items():
        wrapped = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{owner.lower()}-{group}"}, "template": tmpl}
        kv.validate(wrapped, kv.latest_version(), strict=True)


def test_validator_rejects_a_broken_pod_template():
    """The schema check above can fail: a misspelt field is caught."""
    kv = _kubernetes_validate()
    tmpl = pod_templates(cluster_specs()["RayCluster"])["gpu-workers"]
    broken = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "broken"},
              "template": {**tmpl, "spec": {**tmpl["spec"], "tolerationz": tmpl["spec"]["tolerations"]}}}
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, kv.latest_version(), strict=True)


def test_the_built_wheel_carries_the_pipelines_and_resolves_them_by_name(tmp_path):
    """What the Docker image (`pip install .`, not editable) holds: `--config lvd` must work there."""
    import subprocess
    import sys

    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this environment")
    import shutil

    root, src = Path(__file__).resolve().parents[1], tmp_path / "src"
    # build from a copy: an in-tree build would leave build/ and *.egg-info in the checkout
    for package in ("curation", "embedders", "retrieval", "pipelines"):
        shutil.copytree(root / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "whl"), str(src)], check=True)
    wheel = next((tmp_path / "whl").glob("curation-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(tmp_path / "site"), str(wheel)], check=True)
    probe = "import curation.config as c; cfg = c.load_config('lvd'); print(c.__file__); print(len(cfg.stages))"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[0].startswith(str(tmp_path / "site")), "the installed copy, not the checkout, must have answered"
    assert int(out[1]) > 5
