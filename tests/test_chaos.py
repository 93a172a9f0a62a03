"""Chaos: SIGKILL the whole process group of a real ``curate run`` at a random point inside a
randomly chosen stage, resume it, and get the dataset, ledger and manifest counts of an
uninterrupted run.

The pipeline is the demo's (``pipelines/demo.yaml``) on the demo's generated crawl (a few
hundred images with planted duplicates and faults), less the stages that need model weights or
minutes of CPU (nsfw, face_blur), run in two variants: every global stage in one task, and every
global stage that has one in its partitioned form with small partitions. A case names a variant
and a stage kind (ingest, map, global, emit); the seeded RNG picks the stage of that kind and the
point inside it:

* shard-wise stages (ingest, map, emit) and partitioned global stages: right after the k-th of
  the stage's completion markers (shard ``.done`` files, partition-task markers) appears, with k
  drawn below the count the uninterrupted run made, plus a few milliseconds of jitter;
* single-task global stages (one task, no markers): a random fraction of the time that the
  uninterrupted run spent between the stage's ``_form.json`` and its ``_SUCCESS``.

The kill must land inside the chosen stage (its ``_SUCCESS`` absent, the earlier stages'
present); a timed kill that came too late is redrawn (at most twice, in a fresh directory).
Set ``CURATION_CHAOS_SEED`` to replay a failure: the seed is printed and in every message.
One case runs by default (a single-task global stage, the suite's time budget; test_resume and
test_partitioned_ray kill at fixed points); ``pytest -m slow tests/test_chaos.py`` kills every
kind in both variants.
"""

from __future__ import annotations

import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import dataset_rows, ledger_rows, manifest

PROJECT = Path(__file__).resolve().parents[1]
SEED = int(os.environ.get("CURATION_CHAOS_SEED") or secrets.randbelow(2**31))
SKIPPED_KINDS = {"nsfw", "face_blur"}  # weights or minutes of CPU; not what this test is about
VARIANTS = {
    "single_task": {"global_stages": "single_task"},
    "partitioned": {"global_stages": "partitioned", "max_partition_rows": 40, "map_task_rows": 80},
}
KINDS = ("ingest", "map", "global", "emit")
# By default: one shared uninterrupted run and one kill (a single-task global stage);
# tests/test_partitioned_ray.py kills a partitioned stage by default already.


def pipeline_config(variant: str) -> dict:
    demo = yaml.safe_load((PROJECT / "pipelines" / "demo.yaml").read_text())
    return {
        "name": f"chaos-{variant}",
        "seed": 0,
        "ingest": {"shard_size": 30},
        "stages": [s for s in demo["stages"] if s["kind"] not in SKIPPED_KINDS],
        "default_seed_recipes": demo["default_seed_recipes"],
        "execution": VARIANTS[variant],
        "ray": {"num_cpus": 2, "include_dashboard": False},
    }


def stage_dirs(config: dict) -> list[tuple[str, str]]:
    """(directory under stages/, kind of kill) for every stage of the run, in order."""
    from curation.stage import GlobalStage, stage_class

    out = [("00_ingest", "ingest")]
    for i, s in enumerate(config["stages"], start=1):
        out.append((f"{i:02d}_{s.get('name', s['kind'])}", "global" if issubclass(stage_class(s["kind"]), GlobalStage) else "map"))
    return out + [(f"{len(config['stages']) + 1:02d}_emit", "emit")]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict:
    from curation.demo import generate

    root = tmp_path_factory.mktemp("chaos")
    data = generate(root / "data", seed=0, pool_size=120)
    evals = root / "data" / "eval"
    evals.mkdir()
    for i in (3, 40, 77):  # planted evaluation images: their crawl copies are contaminated
        shutil.copyfile(data["crawl"] / f"img_{i:04d}.jpg", evals / f"eval_{i}.jpg")
    configs = {}
    for variant in VARIANTS:
        configs[variant] = root / f"{variant}.yaml"
        configs[variant].write_text(yaml.safe_dump(pipeline_config(variant)))
    return {"root": root, "pools": [data["crawl"], data["local"]], "seeds": data["seeds"], "exclude": evals, "configs": configs}


def start_run(inputs: dict, variant: str, out: Path, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "curation.cli", "run", "--out", str(out), "--config", str(inputs["configs"][variant])]
    for p in inputs["pools"]:
        cmd += ["--pool", str(p)]
    cmd += ["--seeds", str(inputs["seeds"]), "--exclude", str(inputs["exclude"])]
    env = {**os.environ, "PYTHONPATH": str(PROJECT), "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
    with open(log, "ab") as f:  # a file, not a pipe: progress output must never block the run
        return subprocess.Popen(cmd, stdout=f, stderr=f, env=env, start_new_session=True)


def finish(proc: subprocess.Popen, log: Path, what: str) -> None:
    rc = proc.wait(timeout=900)
    assert rc == 0, f"[chaos seed {SEED}] {what} failed (rc {rc}): {log.read_text()[-3000:]}"


_references: dict[str, Path] = {}


@pytest.fixture
def reference(inputs):
    """The uninterrupted run of a variant (made once per module, on first use)."""

    def get(variant: str) -> Path:
        if variant not in _references:
            out = inputs["root"] / f"reference-{variant}"
            finish(start_run(inputs, variant, out, inputs["root"] / f"reference-{variant}.log"), inputs["root"] / f"reference-{variant}.log", f"the uninterrupted {variant} run")
            _references[variant] = out
        return _references[variant]

    return get


def choose_kill(rng: random.Random, ref: Path, variant: str, kind: str) -> dict:
    """The stage and the point inside it, drawn from what the uninterrupted run ``ref`` did."""
    candidates = []
    for i, (name, k) in enumerate(stage_dirs(pipeline_config(variant))):
        if k != kind:
            continue
        form = (ref / "stages" / name / "_form.json").read_text() if k == "global" else ""
        partitioned = '"partitioned"' in form
        if kind == "global" and (variant == "partitioned") != partitioned:
            continue  # in the partitioned variant, kill the partitioned form (retrieve has none)
        candidates.append((i, name, partitioned))
    index, name, partitioned = rng.choice(candidates)
    stage = ref / "stages" / name
    if kind == "global" and not partitioned:
        window = (stage / "_SUCCESS").stat().st_mtime - (stage / "_form.json").stat().st_mtime
        return {"index": index, "stage": name, "pattern": f"stages/{name}/_form.json", "after": 1, "delay": rng.uniform(0, 0.6) * window}
    pattern = f"stages/{name}/steps/*/task-*.json" if partitioned else f"stages/{name}/part-*.done"
    n = len(list(ref.glob(pattern)))
    assert n >= 3, f"stage {name} made only {n} markers; the test needs a few to kill between"
    return {"index": index, "stage": name, "pattern": pattern, "after": rng.randint(1, n - 2), "delay": rng.uniform(0, 0.02)}


def kill_inside(proc: subprocess.Popen, out: Path, point: dict, log: Path) -> None:
    """SIGKILL the run's process group once ``point`` is reached."""
    deadline = time.monotonic() + 900
    while len(list(out.glob(point["pattern"]))) < point["after"]:
        if proc.poll() is not None:
            raise AssertionError(f"[chaos seed {SEED}] the run ended before {point}: {log.read_text()[-3000:]}")
        assert time.monotonic() < deadline, f"[chaos seed {SEED}] {point} never came"
        time.sleep(0.005)
    time.sleep(point["delay"])
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def landed_in(out: Path, variant: str) -> str | None:
    """The stage the run was in: the first one without ``_SUCCESS``."""
    for name, _ in stage_dirs(pipeline_config(variant)):
        if not (out / "stages" / name / "_SUCCESS").exists():
            return name
    return None


DEFAULT_CASES = {("single_task", "global")}  # the suite's time budget: one case by default
CASES = [pytest.param(v, k, marks=() if (v, k) in DEFAULT_CASES else pytest.mark.slow, id=f"{v}-{k}") for v in VARIANTS for k in KINDS]


@pytest.mark.parametrize("variant,kind", CASES)
def test_a_run_killed_inside_a_random_stage_resumes_to_the_uninterrupted_output(inputs, reference, tmp_path, variant, kind):
    ref = reference(variant)
    rng = random.Random(f"{SEED}/{variant}/{kind}")
    for attempt in range(3):
        point = choose_kill(rng, ref, variant, kind)
        if attempt:
            point["delay"] *= 0.5 ** attempt  # a timed kill came too late: redraw it earlier
        out, log = tmp_path / f"run{attempt}", tmp_path / f"run{attempt}.log"
        print(f"chaos seed {SEED}: {variant}, kill in {point['stage']} after {point['after']} x {point['pattern']} + {point['delay']:.3f} s")
        kill_inside(start_run(inputs, variant, out, log), out, point, log)
        if landed_in(out, variant) == point["stage"]:
            break
        print(f"  it landed in {landed_in(out, variant)} instead; drawing again")
    else:
        pytest.fail(f"[chaos seed {SEED}] three kills aimed at {kind} stages of {variant} all landed elsewhere")
    assert not (out / "manifest.json").exists()

    finish(start_run(inputs, variant, out, log), log, f"the resumed run (killed in {point['stage']})")
    why = f"[chaos seed {SEED}] {variant}, killed in {point['stage']} ({point})"
    assert dataset_rows(out) == dataset_rows(ref), why
    assert ledger_rows(out) == ledger_rows(ref), why
    assert manifest(out)["counts"] == manifest(ref)["counts"], why
    assert [s["sha256"] for s in manifest(out)["shards"]] == [s["sha256"] for s in manifest(ref)["shards"]], why
