"""`curate run` with hierarchical balanced sampling on real photos: the cluster recipe samples
the seeded clusters down to its cap, evenly over the top level of a two-level hierarchy, and
the manifest and the printed summary report the levels and the balance."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from curation.cli import EXIT_OK, main
from tests.helpers import TINY_EMBED_STAGES, copy_images

PIPELINE = """
name: balanced-e2e
seed: 0
ingest: {{shard_size: 60}}
stages:
""" + TINY_EMBED_STAGES + """  - kind: retrieve
    clustering: {{clusters: 12, points_per_cluster: 10, resampling_steps: 1, hierarchy: {{levels: [3], resampling_steps: 3}}}}
seeds_catalog:
  cal:
    path: {cal}
    recipes: [{{method: cluster, min_seeds: 0, per_cluster: 1000, cap: 36, sampling: balanced, pick: random}}]
ray: {{num_cpus: 2, include_dashboard: false}}
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, shared_data, ray_local):
    root = tmp_path_factory.mktemp("balanced_e2e")
    classes = sorted(p.name for p in (shared_data / "pool_caltech101").iterdir() if p.is_dir())[:24]
    pool = root / "pool"
    copy_images(shared_data / "pool_caltech101", pool, per_class=5, classes=classes)
    cal = root / "seeds_cal"
    for f in copy_images(shared_data / "pool_caltech101", root / "all", per_class=7, classes=classes):
        if not (pool / f.parent.name / f.name).exists():  # seeds are other photos of the pool's classes
            (cal / f.parent.name).mkdir(parents=True, exist_ok=True)
            f.rename(cal / f.parent.name / f.name)
    cfg = root / "pipeline.yaml"
    cfg.write_text(PIPELINE.format(cal=cal))
    out = root / "out"
    code = main(["run", "--pool", str(pool), "--seeds", "cal", "--config", str(cfg), "--out", str(out)])
    assert code == EXIT_OK
    return out, sum(1 for p in pool.rglob("*") if p.is_file())


def test_balanced_sampling_keeps_the_cap_spread_evenly_over_the_top_level(run, capsys):
    out, n_pool = run
    m = json.loads((out / "manifest.json").read_text())
    summary = next(s for s in m["stages"] if s["stage"] == "retrieve")["summary"]
    assert summary["pool_clustering"]["levels"] == [12, 3]
    recipe = m["seeds"]["cal"]["retrieval"]["recipes"][0]
    assert (recipe["sampling"], recipe["pick"], recipe["capped"]) == ("balanced", "random", True)
    assert recipe["retrieved"] == 36 and recipe["top_clusters_used"] >= 2
    lo, _, hi = recipe["images_per_top_cluster"]
    assert lo + hi == 36 if recipe["top_clusters_used"] == 2 else lo <= 36 // recipe["top_clusters_used"] <= hi
    rows = [r for p in sorted((out / "dataset").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    pool_rows = [r for r in rows if r["source"] == "pool"]
    assert len(pool_rows) == 36 and {r["method"] for r in pool_rows} == {"cluster"}
    dropped = sum(v for k, v in m["counts"]["dropped"].items() if k not in ("used_as_query",))
    assert dropped + len(pool_rows) == n_pool  # every pool photo kept or dropped with a reason
    from curation.summary import print_summary

    print_summary(m)
    text = capsys.readouterr().out
    assert "cluster recipe, balanced over levels [12, 3]: 36 images" in text
