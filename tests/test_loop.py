"""The loop the product exists for: curate a dataset, pretrain on its manifest, export the
teacher, and use that checkpoint as the retrieval embedder of the next curation round."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import yaml

from curation.config import load_config
from curation.runner import RunRequest, run_pipeline
from tests.helpers import copy_images, manifest


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "curation.cli", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_curate_train_export_and_curate_again(tmp_path, shared_data, ray_local):
    pool = tmp_path / "pool"
    copy_images(shared_data / "pool_caltech101", pool, per_class=6, classes=["pizza", "umbrella", "accordion", "llama", "dalmatian"])
    seeds = tmp_path / "seeds"
    for wnid in ("n07873807", "n04507155", "n02672831"):  # pizza, umbrella, accordion
        (seeds / wnid).mkdir(parents=True)
        for f in (shared_data / "seeds_imagenet").glob(f"{wnid}_*.JPEG"):
            shutil.copyfile(f, seeds / wnid / f.name)

    first = tmp_path / "round1"
    run_pipeline(RunRequest(pools=[str(pool)], out=first, config=load_config("smoke")))
    assert manifest(first)["counts"]["kept"] == 30

    train_cfg = tmp_path / "train.yaml"
    train_cfg.write_text(yaml.safe_dump({
        "model": {"arch": "custom", "embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8},
        "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
        "optim": {"epochs": 1, "iters_per_epoch": 2, "batch_size": 4, "warmup_epochs": 0.5},
        "data": {"num_workers": 0, "shuffle_buffer": 8},
    }))
    cli("train", "--manifest", str(first / "manifest.json"), "--output", str(tmp_path / "train"), "--config", str(train_cfg))
    export = tmp_path / "teacher.pt"
    cli("export", "--checkpoint", str(tmp_path / "train"), "--output", str(export))

    pipeline = tmp_path / "round2.yaml"
    pipeline.write_text(yaml.safe_dump({
        "ingest": {"shard_size": 16},
        "stages": [
            {"kind": "decode", "min_side": 32},
            {"kind": "exact_dedup"},
            {"kind": "embed", "model": {"type": "timm", "checkpoint": str(export)}, "batch_size": 16},
            {"kind": "retrieve", "clustering": {"points_per_cluster": 10}},
        ],
        "default_seed_recipes": [{"method": "as_is"}, {"method": "sample", "k": 2}],
        "ray": {"num_cpus": 2, "include_dashboard": False},
    }))
    second = tmp_path / "round2"
    run_pipeline(RunRequest(pools=[str(pool)], seeds=[str(seeds)], out=second, config=load_config(pipeline)))
    m = manifest(second)
    assert m["counts"]["input"] == m["counts"]["kept"] + sum(m["counts"]["dropped"].values())
    rows = [r for s in m["shards"] for r in pq.read_table(second / s["path"], columns=["source", "method", "seed_ids", "similarity"]).to_pylist()]
    retrieved = [r for r in rows if r["source"] == "pool"]
    n_seeds = sum(1 for _ in seeds.rglob("*.JPEG"))
    assert 0 < len(retrieved) <= 2 * n_seeds
    assert all(r["method"] == "sample" and r["seed_ids"] and -1 <= r["similarity"] <= 1 for r in retrieved)
    assert m["counts"]["dropped"].get("not_retrieved", 0) == 30 - len(retrieved)
    embedded = pq.read_table(next((second / "stages").glob("*_embed/part-*.parquet")), columns=["embedding"])
    assert embedded.schema.field("embedding").type.list_size == 48  # the trainer's embed_dim
