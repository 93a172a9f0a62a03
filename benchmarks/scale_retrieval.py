"""Scale of the partitioned ``retrieve`` stage: memory per task bounded, recall against exact search.

Synthetic embeddings (64-d float16, unit rows around 512 topics) form the pool; planted seed
neighbourhoods come in two seed datasets:

* ``sampled`` (the sample recipe, k = 4): each seed is a perturbed copy of one pool image, so its
  planted neighbour is known; the seeds grow with the pool (10k at 0.5M to 100k at 4M);
* ``clustered`` (the cluster recipe, C = 1,000, hierarchical balanced sampling over levels
  [100, 10], cap 20,000): 2,000 seeds near 20 of the topics.

``retrieve`` runs through the real executor on a local Ray in its partitioned form, each N in a
fresh driver process. Reported per step: wall and task seconds, peak RSS of the largest task
(sampled inside every task) and of the driver; per run: the stage's own recall of sample
retrieval against exact search (1,000 sampled seeds, measured on every run), the planted
neighbours found, and the cluster recipe's balance. k-means alone is timed for C = 1k and 10k
on its bounded training sample (256 points per centroid), which does not grow with N. Planning a
10M-line URL list is measured by ``benchmarks/plan_scale.py``; its committed figures are quoted.

    .venv/bin/python benchmarks/scale_retrieval.py --quick     # 40k and 80k pool images, a minute
    .venv/bin/python benchmarks/scale_retrieval.py             # 0.5M, 1M, 2M, 4M (about an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, device_name, git_commit, write_result  # noqa: E402  (benchmarks/ is on sys.path)

import numpy as np  # noqa: E402

DIM, TOPICS = 64, 512
SEEDS_PER_POOL = 100_000 / 4_000_000  # 12.5k sampled seeds at 0.5M ... 100k at 4M
STAGE = {
    "kind": "retrieve",
    # Index shards of max_partition_rows vectors; "auto" makes each an IVF,SQ8 index (Flat up to 100k).
    "index": {"spec": "auto", "nprobe": 32, "recall_queries": 1000},  # the defaults
    "clustering": {"clusters": 1_000, "points_per_cluster": 1, "hierarchy": {"levels": [100, 10], "resampling_steps": 5}},
}
SEEDS = {
    "sampled": {"path": "/synthetic/sampled", "recipes": [{"method": "sample", "k": 4, "min_similarity": None}]},
    "clustered": {"path": "/synthetic/clustered", "recipes": [{"method": "cluster", "min_seeds": 3, "per_cluster": 10_000, "cap": 20_000,
                                                               "sampling": "balanced", "pick": "random"}]},
}


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


# ---------------------------------------------------------------------------------------------
# Child processes: generate one N, drive one N
# ---------------------------------------------------------------------------------------------
def write_shards(run_dir: Path, n: int, shard_rows: int, seed: int) -> None:
    """Pool shards generated one at a time (memory of one shard), then the seed shards; the
    planted neighbour of every sampled seed goes to ``planted.npz``."""
    import pyarrow as pa

    from curation import schema
    from curation.store import INGEST, RunStore, StageRecord, write_parquet_atomic

    topics = unit(np.random.default_rng(seed).standard_normal((TOPICS, DIM)))
    n_seeds = max(1_000, round(n * SEEDS_PER_POOL))
    pick_rate = n_seeds / n
    rec = StageRecord(0, "ingest", "ingest", INGEST, [schema.ID, schema.ROLE, schema.SOURCE, schema.SOURCE_KEY, schema.SEED_DATASET, "embedding"])
    store = RunStore(run_dir)
    seeds, planted, shard = [], [], 0

    def write(x, role, dataset):
        nonlocal shard
        m = len(x)
        uid = (np.int64(shard) << schema.UID_SHARD_BITS) | np.arange(m, dtype=np.int64)
        t = pa.table({
            schema.UID: pa.array(uid, pa.int64()),
            schema.ID: pa.array([f"{shard:06x}{r:08x}" for r in range(m)]),
            schema.ROLE: pa.array([role] * m),
            schema.SOURCE: pa.array(["synthetic"] * m),
            schema.SOURCE_KEY: pa.array([f"s{shard}r{r}" for r in range(m)]),
            schema.SEED_DATASET: pa.array(dataset, pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float16).reshape(-1), pa.float16()), DIM),
        })
        write_parquet_atomic(t, store.part_path(rec, shard))
        store.mark_shard_done(rec, shard, {})
        shard += 1
        return uid

    for start in range(0, n, shard_rows):
        m = min(shard_rows, n - start)
        rng = np.random.default_rng([seed, start])
        topic = rng.integers(0, TOPICS, m)
        x = unit(topics[topic] + 0.12 * rng.standard_normal((m, DIM)))
        uid = write(x, schema.POOL, [None] * m)
        chosen = np.flatnonzero(rng.random(m) < pick_rate)
        seeds.append(unit(x[chosen] + 0.02 * rng.standard_normal((len(chosen), DIM))))
        planted.append(uid[chosen])
    rng = np.random.default_rng([seed, 1])
    sampled = np.concatenate(seeds)
    planted_uids = np.concatenate(planted)
    seed_uids = []
    for start in range(0, len(sampled), shard_rows):
        seed_uids.append(write(sampled[start:start + shard_rows], schema.SEED, ["sampled"] * len(sampled[start:start + shard_rows])))
    near = topics[rng.choice(TOPICS, 20, replace=False)]
    clustered = unit(near[rng.integers(0, 20, 2_000)] + 0.12 * rng.standard_normal((2_000, DIM)))
    write(clustered, schema.SEED, ["clustered"] * len(clustered))
    np.savez(run_dir / "planted.npz", seed_uids=np.concatenate(seed_uids), neighbour_uids=planted_uids)
    (run_dir / "ingest.json").write_text(json.dumps({**rec.to_dict(), "n_pool": n, "n_sampled_seeds": int(len(sampled))}))


def drive(run_dir: Path, seed: int, max_partition_rows: int) -> dict:
    """The driver of one run: retrieve through the executor, partitioned."""
    import ray

    from curation.config import ExecutionConfig
    from curation.executor import RayExecutor
    from curation.partitioned.monitor import TaskMonitor
    from curation.shard_ops import StageSpec
    from curation.stage import StageContext, stage_class
    from curation.store import GLOBAL, RunStore, StageRecord

    monitor = TaskMonitor(interval=0.05).start()
    meta = json.loads((run_dir / "ingest.json").read_text())
    base = StageRecord(**{k: v for k, v in meta.items() if not k.startswith("n_")})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = RunStore(run_dir)
    cls = stage_class("retrieve")
    cfg = cls.Config.model_validate(STAGE)
    rec = StageRecord(1, cfg.stage_name, "retrieve", GLOBAL, [])
    ctx = StageContext(run_dir=run_dir, stage_dir=store.stage_dir(rec), seed=seed, seeds=SEEDS)
    spec = StageSpec("retrieve", cfg.model_dump(mode="json"), ctx.to_dict(), rec.to_dict(), [base.to_dict()])
    t0 = time.perf_counter()
    stats = RayExecutor(store, ExecutionConfig(global_stages="partitioned", max_partition_rows=max_partition_rows)).global_stage(spec.stage(), spec)
    wall = time.perf_counter() - t0
    ray.shutdown()
    steps = stats["steps"]
    return {
        "dir": str(store.stage_dir(rec)),
        "wall_seconds": round(wall, 2),
        "largest_task_peak_rss_mb": max(s["peak_rss_mb_max"] for s in steps),
        "largest_task_step": max(steps, key=lambda s: s["peak_rss_mb_max"])["step"],
        "steps": steps,
        "summary": stats["summary"],
        "driver_peak_rss_mb": monitor.stop()["peak_rss_mb"],
    }


def planted_found(run_dir: Path, stage_dir: Path) -> dict:
    """Sampled seeds whose planted neighbour (the pool image they were made from) was retrieved
    with that seed among its links."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = np.load(run_dir / "planted.npz")
    files = sorted((stage_dir / "annotations").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f, columns=["uid", "method"]) for f in files])
    retrieved = t.filter(pa.compute.is_valid(t.column("method"))).column("uid").to_numpy()
    found = np.isin(p["neighbour_uids"], retrieved)
    return {"seeds": int(len(found)), "planted_neighbour_retrieved": round(float(found.mean()), 4)}


def kmeans_timing(clusters: int, seed: int) -> dict:
    """faiss k-means on the stage's bounded training sample (256 points per centroid, 20 iterations)."""
    from curation.partitioned.monitor import TaskMonitor
    from retrieval.kmeans import kmeans

    monitor = TaskMonitor(interval=0.05).start()
    rng = np.random.default_rng(seed)
    topics = unit(rng.standard_normal((TOPICS, DIM)))
    n = clusters * 256
    x = unit(topics[rng.integers(0, TOPICS, n)] + 0.12 * rng.standard_normal((n, DIM))).astype(np.float32)
    t0 = time.perf_counter()
    res = kmeans(x, clusters, niter=20, seed=seed, spherical=True, gpu="never", max_points_per_centroid=256)
    seconds = time.perf_counter() - t0
    return {"clusters": clusters, "train_points": n, "niter": 20, "seconds": round(seconds, 1),
            "empty_clusters": int((res.sizes() == 0).sum()), "peak_rss_mb": monitor.stop()["peak_rss_mb"]}


# ---------------------------------------------------------------------------------------------
# Parent
# ---------------------------------------------------------------------------------------------
def _python(args_: list[str]) -> str:
    proc = subprocess.run([sys.executable, __file__, *args_], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{args_[:2]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return next(ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{"))


def run_one(args, n: int) -> dict:
    run_dir = args.work / f"run-{n}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--generate", str(n), "--run-dir", str(run_dir), "--shard-rows", str(args.shard_rows),
                    "--seed", str(args.seed)], check=True)
    generated = time.perf_counter() - t0
    result = json.loads(_python(["--drive", str(run_dir), "--seed", str(args.seed), "--max-partition-rows", str(args.max_partition_rows)]))
    stage_dir = Path(result.pop("dir"))
    meta = json.loads((run_dir / "ingest.json").read_text())
    result.update({"n": n, "sampled_seeds": meta["n_sampled_seeds"], "generate_seconds": round(generated, 1),
                   "planted": planted_found(run_dir, stage_dir),
                   "measured": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()}})
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def print_table(runs: list[dict]) -> None:
    print(f"{'N pool':>9} {'seeds':>7} {'wall s':>7} {'task MB':>8} {'(step)':>10} {'driver MB':>9} {'recall':>7} {'planted':>8} {'kmeans s':>8} {'top-level spread':>18}")
    for r in runs:
        s = r["summary"]
        rec = s["seed_datasets"]["clustered"]["recipes"][0]
        spread = "/".join(f"{v:g}" for v in rec.get("images_per_top_cluster", []))
        print(f"{r['n']:>9} {r['sampled_seeds']:>7} {r['wall_seconds']:>7.0f} {r['largest_task_peak_rss_mb']:>8.0f} {r['largest_task_step']:>10} "
              f"{r['driver_peak_rss_mb']:>9.0f} {'exact' if s['sample_search']['exact'] else s['sample_search']['recall']!s:>7} {r['planted']['planted_neighbour_retrieved']:>8} "
              f"{s['pool_clustering']['seconds']:>8.1f} {spread:>18}")
    print("per step (largest N): " + ", ".join(f"{st['step']} {st['tasks']} tasks {st['peak_rss_mb_max']:.0f} MB" for st in runs[-1]["steps"]))


def recall_of(run: dict) -> float:
    """The stage's measured recall; 1.0 where every index shard was exact (nothing to measure)."""
    search = run["summary"]["sample_search"]
    return 1.0 if search["exact"] else search["recall"]


def scaling(runs: list[dict]) -> dict:
    a, b = runs[0], runs[-1]
    nlogn = (b["n"] * math.log(b["n"])) / (a["n"] * math.log(a["n"]))
    work = (b["n"] * b["sampled_seeds"]) / (a["n"] * a["sampled_seeds"])
    return {
        "n_from": a["n"], "n_to": b["n"], "n_ratio": b["n"] / a["n"], "n_log_n_ratio": round(nlogn, 3),
        "pool_x_seeds_ratio": round(work, 2),
        "largest_task_rss_ratio": round(b["largest_task_peak_rss_mb"] / a["largest_task_peak_rss_mb"], 3),
        "driver_rss_ratio": round(b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 3),
        "wall_ratio": round(b["wall_seconds"] / a["wall_seconds"], 3),
        "min_recall": min(recall_of(r) for r in runs),
    }


def planning_figures() -> dict | None:
    path = RESULTS / f"plan_scale-{device_name()}.json"
    if not path.exists():
        return None
    old = json.loads(path.read_text())
    figures = old.get("figures", {})
    sizes = {n: {k: v[k] for k in ("lines", "seconds", "peak_rss_mb", "plan_files") if k in v} for n, v in figures.get("sizes", {}).items()}
    return {"from": path.name, "date": old.get("date"), "commit": old.get("commit"), "sizes": sizes,
            "driver_peak_rss_ratio_10m_over_1m": figures.get("peak_rss_ratio_last_over_first")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 40k and 80k, shards and partitions scaled down")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--max-partition-rows", type=int, default=250_000)
    ap.add_argument("--kmeans", type=int, nargs="*", default=[1_000, 10_000], help="C values timed alone")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "curation-scale-retrieval")
    ap.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--drive", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--kmeans-one", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate is not None:
        return write_shards(args.run_dir, args.generate, args.shard_rows, args.seed)
    if args.drive is not None:
        return print(json.dumps(drive(args.drive, args.seed, args.max_partition_rows)))
    if args.kmeans_one is not None:
        return print(json.dumps(kmeans_timing(args.kmeans_one, args.seed)))
    if args.quick:
        args.shard_rows, args.max_partition_rows = 10_000, 25_000
        args.kmeans = [100, 1_000]
    sizes = args.sizes or ([40_000, 80_000] if args.quick else [500_000, 4_000_000, 1_000_000, 2_000_000])
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "scale_retrieval", "cpus": os.cpu_count(), "dim": DIM, "topics": TOPICS, "stage_config": STAGE, "seeds": SEEDS,
              "shard_rows": args.shard_rows, "max_partition_rows": args.max_partition_rows, "runs": [], "kmeans": [],
              "planning": planning_figures()}
    for c in args.kmeans:
        report["kmeans"].append(json.loads(_python(["--kmeans-one", str(c), "--seed", str(args.seed)])))
        print(f"k-means C={c}: {report['kmeans'][-1]}", flush=True)
    # Smallest and largest first, so an interrupted benchmark still has the two ends.
    for n in sizes:
        t0 = time.perf_counter()
        report["runs"] = sorted([*report["runs"], run_one(args, n)], key=lambda r: r["n"])
        print(f"N={n}: {time.perf_counter() - t0:.0f} s", flush=True)
        print_table(report["runs"])
        if len(report["runs"]) >= 2:
            report["scaling"] = scaling(report["runs"])
            print(json.dumps(report["scaling"], indent=1))
        write_result("scale_retrieval", report, quick=args.quick)


if __name__ == "__main__":
    main()
