"""`curate run` with seeds on real images: the LVD dataset is seeds (as is) + retrieved pool
images, every retrieved image carries provenance, and the manifest reports Table 15 figures."""

from __future__ import annotations

import shutil

import pyarrow.parquet as pq
import pytest

from curation.config import load_config
from curation.runner import RunRequest, run_pipeline
from tests.helpers import TINY_EMBED_STAGES, copy_images, manifest

# A full Ray run (~1-2 min on 2 shared cores): `pytest -m slow tests/test_retrieval_e2e.py`.
pytestmark = pytest.mark.slow

PIPELINE = """
name: retrieval-e2e
seed: 0
ingest: {{shard_size: 100}}
stages:
""" + TINY_EMBED_STAGES + """  - kind: retrieve
    clustering: {{points_per_cluster: 20}}
seeds_catalog:
  inet:
    path: {inet}
    recipes: [{{method: as_is}}, {{method: sample, k: 2}}]
  cal:
    path: {cal}
    recipes: [{{method: cluster, min_seeds: 3, per_cluster: 1000, cap: 40}}]
ray: {{num_cpus: 2, include_dashboard: false}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, ray_local):
    root = tmp_path_factory.mktemp("retrieval_e2e")
    inet = root / "seeds_inet"
    for f in sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[:30]:
        (inet / f.name.split("_")[0]).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, inet / f.name.split("_")[0] / f.name)
    cal = root / "seeds_cal"
    copy_images(shared_data / "pool_caltech101", cal, per_class=2, classes=["accordion", "pizza", "umbrella", "llama", "panda"])
    pool = root / "pool"
    classes = sorted(p.name for p in (shared_data / "pool_caltech101").iterdir() if p.is_dir())[:20]
    copy_images(shared_data / "pool_caltech101", pool, per_class=10, classes=classes)
    # The pool must not hold the very files used as cal seeds (they would be exact duplicates).
    for f in cal.rglob("*.jpg"):
        (pool / f.parent.name / f.name).unlink(missing_ok=True)
    cfg_path = root / "pipeline.yaml"
    cfg_path.write_text(PIPELINE.format(inet=inet, cal=cal))
    out = root / "out"
    run_pipeline(RunRequest(pools=[str(pool)], seeds=["inet", "cal"], out=out, config=load_config(cfg_path)))
    return out, sum(1 for p in pool.rglob("*") if p.is_file())


def dataset(run_dir):
    rows = []
    for p in sorted((run_dir / "dataset").glob("*.parquet")):
        rows += pq.read_table(p).to_pylist()
    return rows


def test_dataset_is_as_is_seeds_plus_retrieved_pool_with_provenance(run):
    run, _ = run
    rows = dataset(run)
    pool_rows = [r for r in rows if r["source"] == "pool"]
    seed_rows = [r for r in rows if r["source"].startswith("seed:")]
    assert len(seed_rows) == 30 and {r["seed_dataset"] for r in seed_rows} == {"inet"}
    assert {r["method"] for r in seed_rows} == {"as_is"}
    assert pool_rows, "retrieval kept no pool image"
    for r in pool_rows:
        assert r["method"] in {"sample", "cluster", "sample+cluster"}
        assert set(r["seed_dataset"].split(",")) <= {"inet", "cal"}
        assert r["seed_ids"] and -1.0 <= r["similarity"] <= 1.0001
        assert (r["cluster_id"] is not None) == ("cluster" in r["method"])
        if r["method"] == "sample":
            assert r["seed_dataset"] == "inet"
    assert "embedding" not in rows[0]  # embeddings stay in the stage directory


def test_manifest_reports_table15_figures_and_the_ledger_explains_every_pool_image(run):
    run, n_pool = run
    m = manifest(run)
    inet, cal = m["seeds"]["inet"]["retrieval"], m["seeds"]["cal"]["retrieval"]
    assert inet["seed_images"] == 30 and inet["retrieved"] == 60  # 30 seeds x k=2
    assert inet["final"] == inet["retrieved"] - inet["collisions"]
    assert cal["seed_images"] == 10 and cal["final"] <= 40  # the cap
    rows = dataset(run)
    retrieved = [r for r in rows if r["source"] == "pool"]
    assert len(retrieved) == len({r["uid"] for r in retrieved})
    per_ds = {d: sum(1 for r in retrieved if d in r["seed_dataset"].split(",")) for d in ("inet", "cal")}
    assert per_ds == {"inet": inet["final"], "cal": cal["final"]}
    # Every pool image is either in the dataset or dropped with a reason (decode or not_retrieved).
    pool_drops = sum(v for k, v in m["counts"]["dropped"].items() if k not in ("used_as_query", "evaluation_set"))
    assert pool_drops + len(retrieved) == n_pool
    assert m["counts"]["dropped"]["not_retrieved"] > 0
    assert m["counts"]["dropped"]["used_as_query"] == 10  # cal seeds are queries only (no as_is)
