"""Scale of the partitioned deduplication stages: memory per task bounded, time ~ N log N.

Synthetic crawl rows (``curation.dedup.synthetic.scale_dataset``: 64-d (``--dim``) float16 copy-detection
descriptors with semantic structure and planted copy and re-encode groups, 64-bit hashes with
planted near-duplicates, content ids with exact duplicates, plus 1% evaluation images of which
half are copies of pool images) are written as ingest shards into a run directory, and every
deduplication stage runs through the real executor on a local Ray in its partitioned form:
``exact_dedup``, ``phash_dedup`` (radius 6), ``pca_hash`` (64 bits, radius 2), ``copy_dedup``
(k = 64) and ``decontaminate``. Each N runs in a fresh driver process. Reported per stage:

* wall seconds, and the task seconds per step;
* peak RSS of the largest task (sampled inside every task) and of the driver;
* planted groups recovered (all members of a planted group end in one kept image), and rows
  dropped that no planted group explains (genuine collisions: e.g. random 64-bit hashes within
  radius 6, about N^2/2 x 4.5e-12 pairs);
* for the k-NN graph: recall@64 against exact search on ~1,000 sampled queries (measured by the
  stage itself, on every run) and the IVF search time against the exact search time (the exact
  search of the sampled queries, timed in the same run, scaled to all N queries).

With ``--two-node`` the smallest N is run again on a loopback two-node cluster (``ray start``
twice on 127.0.0.1, one CPU each): it reports which nodes ran each step's tasks and whether
every stage's drops are identical to the single-node run.

    .venv/bin/python benchmarks/scale.py --quick              # 20k and 40k rows, seconds
    .venv/bin/python benchmarks/scale.py --two-node           # 0.5M, 1M, 2M, 4M (hours on 2 cores)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, ROOT, device_name, git_commit, write_result  # noqa: E402  (benchmarks/ is on sys.path)

import numpy as np  # noqa: E402

DIM = 64  # the range is 64-256; 64 keeps the 4M run within a session on 2 cores
THRESHOLD = 0.8  # copies sit at cosine >= 0.88 in this synthetic space, distinct images below 0.7
STAGES = {
    "exact_dedup": {},
    "phash_dedup": {"radius": 6, "flip": False},
    # Radius 4: the planted re-encodes (cosine ~0.99999) differ in up to 4 sign bits at 4M (31
    # groups at 3 bits, 1 at 4, of 40k): a vector near a hyperplane flips its bit.
    "pca_hash": {"descriptor": "sscd_descriptor", "bits": 64, "radius": 4},
    # Each vector is searched in the lists whose centroid is within a cosine margin of its
    # nearest. Simulated on this generator's 4M descriptors (every planted pair checked, two
    # quantizer seeds): 10 fixed probes left 3 copy groups split (the run measured 4), 26 pairs
    # unlinked, recall@64 0.979; margin 0.15 (5 to 16 lists) none split but 4-6 pairs unlinked,
    # ~63% of the search, and the run left 1 group of 237,641 split; margin 0.25 (6 to 32
    # lists, ~10.6 per vector) no pair unlinked at recall 0.990, about the search of 10 fixed.
    # Decontamination keeps 0.15: a contaminated component needs one link to the evaluation
    # image, and it recovered every one. Lists of 12.5k: 40 at 0.5M to 320 at 4M.
    "copy_dedup": {"threshold": THRESHOLD, "index": {"list_size": 12_500, "list_probe": 32, "list_probe_margin": 0.25, "list_probe_min": 6}},
    "decontaminate": {"threshold": THRESHOLD, "index": {"list_size": 12_500, "list_probe": 16, "list_probe_margin": 0.15, "list_probe_min": 5}},
}


# ---------------------------------------------------------------------------------------------
# Child: one N in its own process
# ---------------------------------------------------------------------------------------------
def write_shards(run_dir: Path, n: int, shard_rows: int, seed: int, dim: int = DIM) -> None:
    """Ingest-shaped shards of the synthetic rows, plus ``planted.npz`` (what was planted where)
    and ``ingest.json`` (the ingest record the stages read from)."""
    import pyarrow as pa

    from curation import schema
    from curation.dedup.synthetic import scale_dataset
    from curation.store import INGEST, RunStore, StageRecord, write_parquet_atomic

    n_eval = max(10, n // 100)
    data = scale_dataset(n + n_eval, dim, seed=seed)
    rng = np.random.default_rng(seed + 7)
    role = np.full(n + n_eval, schema.POOL, object)
    # Evaluation images: half of them copies of pool images (rows of copy groups), half unrelated.
    in_groups = np.flatnonzero(np.bincount(data.copy_group)[data.copy_group] > 1)
    singles = np.setdiff1d(np.arange(n + n_eval), in_groups)
    evals = np.concatenate([rng.choice(in_groups, n_eval // 2, replace=False), rng.choice(singles, n_eval - n_eval // 2, replace=False)])
    role[evals] = schema.EXCLUDE
    width, height = rng.integers(64, 1024, n + n_eval), rng.integers(64, 1024, n + n_eval)
    rec = StageRecord(0, "ingest", "ingest", INGEST, [schema.ID, schema.ROLE, schema.SOURCE, schema.SOURCE_KEY, schema.WIDTH, schema.HEIGHT, schema.SEED_DATASET, "phash", "sscd_descriptor"])
    store = RunStore(run_dir)
    total = n + n_eval
    for shard, start in enumerate(range(0, total, shard_rows)):
        stop = min(total, start + shard_rows)
        rows = np.arange(start, stop)
        uid = (np.int64(shard) << schema.UID_SHARD_BITS) | np.arange(stop - start, dtype=np.int64)
        ids = data.ids[rows]
        ids = np.where(role[rows] == schema.EXCLUDE, -(rows + 1), ids)  # evaluation ids are their own
        x = data.x[rows]
        t = pa.table(
            {
                schema.UID: pa.array(uid, pa.int64()),
                schema.ID: pa.array([f"{int(v) & (2**64 - 1):016x}" for v in ids]),
                schema.ROLE: pa.array(role[rows].tolist()),
                schema.SOURCE: pa.array(["synthetic"] * len(rows)),
                schema.SOURCE_KEY: pa.array([f"r{r}" for r in rows]),
                schema.WIDTH: pa.array(width[rows], pa.int32()),
                schema.HEIGHT: pa.array(height[rows], pa.int32()),
                schema.SEED_DATASET: pa.nulls(len(rows), pa.string()),
                "phash": pa.array(data.phash[rows], pa.uint64()),
                "sscd_descriptor": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float16()), dim),
            }
        )
        write_parquet_atomic(t, store.part_path(rec, shard))
        store.mark_shard_done(rec, shard, {})
    uids = np.concatenate([(np.int64(s) << schema.UID_SHARD_BITS) | np.arange(min(shard_rows, total - s * shard_rows), dtype=np.int64) for s in range(math.ceil(total / shard_rows))])
    np.savez(run_dir / "planted.npz", copy_group=data.copy_group, reencode=data.reencode, hash_group=data.hash_group,
             ids=data.ids, role=role.astype(str), uids=uids)
    (run_dir / "ingest.json").write_text(json.dumps(rec.to_dict()))


def read_drops(stage_dir: Path) -> dict[int, int]:
    """uid -> kept uid (the image each drop was a copy of; for decontamination the uid itself)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((stage_dir / "drops").glob("*.parquet"))
    t = pa.concat_tables([pq.read_table(f) for f in files]) if files else None
    if t is None or t.num_rows == 0:
        return {}
    out = {}
    for u, d in zip(t.column("uid").to_pylist(), t.column("drop_details").to_pylist()):
        details = json.loads(d) if d else {}
        out[u] = details.get("kept_uid", u)
    return out


def digest(stage_dir: Path) -> str:
    import pyarrow.parquet as pq

    h = hashlib.sha256()
    for f in sorted((stage_dir / "drops").glob("*.parquet")):
        t = pq.read_table(f)
        for row in zip(*(t.column(c).to_pylist() for c in t.column_names)):
            h.update(repr(row).encode())
    return h.hexdigest()[:16]


def planted_outcome(groups: np.ndarray, uids: np.ndarray, applies: np.ndarray, dropped: dict[int, int]):
    """Among the rows the stage applies to: each row's planted group, whether it is in a planted
    group (one of 2+ rows), and for every planted group (ascending) whether all its members end
    in one kept image."""
    rows = np.flatnonzero(applies)
    g = groups[rows]
    planted = np.bincount(g, minlength=int(groups.max()) + 1)[g] > 1
    comp = np.array([dropped.get(int(u), int(u)) for u in uids[rows]], np.int64)
    order = np.lexsort((comp[planted], g[planted]))
    gp, cp = g[planted][order], comp[planted][order]
    starts = np.flatnonzero(np.r_[True, gp[1:] != gp[:-1]]) if len(gp) else np.zeros(0, np.int64)
    ok = np.minimum.reduceat(cp, starts) == np.maximum.reduceat(cp, starts) if len(starts) else np.zeros(0, bool)
    return rows, g, planted, gp[starts], ok


def recovery(groups: np.ndarray, uids: np.ndarray, applies: np.ndarray, dropped: dict[int, int], explained: np.ndarray | None = None) -> dict:
    """Planted groups (rows sharing a value of ``groups`` among the rows the stage applies to)
    whose members all end in one kept image; and drops that no planted duplicate explains
    (``explained``: rows planted as duplicates of any kind, by default those of ``groups``)."""
    rows, _, planted, group_ids, ok = planted_outcome(groups, uids, applies, dropped)
    was_dropped = np.array([int(u) in dropped for u in uids[rows]])
    explained = planted if explained is None else explained[rows]
    return {
        "planted_groups": int(len(group_ids)),
        "recovered": int(ok.sum()),
        "expected_drops": int(planted.sum() - len(group_ids)),
        "drops": int(was_dropped.sum()),
        "unplanted_rows_dropped": int((was_dropped & ~explained).sum()),
    }


def beyond_radius(run_dir: Path, stage_dir: Path, groups: np.ndarray, uids: np.ndarray, applies: np.ndarray, dropped: dict[int, int], radius: int) -> dict:
    """Planted PCA-hash groups left split, and how many of them cannot be joined at the stage's
    radius at all: their members' sign codes (the stage's own projection, from its ``pca``
    artifact) are not connected by steps of at most ``radius`` bits. Those are the limit of
    sign-bit hashing (a re-encode flipped more bits than the radius), not pairs the search missed."""
    import pyarrow.parquet as pq

    from curation.dedup.components import connected_components
    from curation.dedup.descriptors import descriptor_matrix, normalize_rows
    from curation.dedup.pca_hash import PcaProjection, sign_codes

    rows, g, planted, group_ids, ok = planted_outcome(groups, uids, applies, dropped)
    in_split = planted & np.isin(g, group_ids[~ok])
    members, member_group = uids[rows][in_split], g[in_split]
    if len(members) == 0:
        return {"groups": 0, "beyond_radius": 0}
    art = np.load(stage_dir / "steps" / "pca" / "artifact.npz")
    proj = PcaProjection(art["mean"], art["components"], art["explained_variance"], float(art["total_variance"]))
    xs, us = [], []
    for f in sorted((run_dir / "stages" / "00_ingest").glob("part-*.parquet")):
        t = pq.read_table(f, columns=["uid", "sscd_descriptor"])
        shard_uids = t.column("uid").to_numpy()
        keep = np.isin(shard_uids, members)
        if keep.any():
            xs.append(descriptor_matrix(t.column("sscd_descriptor").filter(keep), "sscd_descriptor")[0])
            us.append(shard_uids[keep])
    got = np.concatenate(us)
    if set(got.tolist()) != set(members.tolist()):
        raise RuntimeError("the ingest shards lack some members of the split PCA-hash groups")
    codes = sign_codes(normalize_rows(np.concatenate(xs)), proj)
    group_of = dict(zip(members.tolist(), member_group.tolist()))
    gg = np.array([group_of[int(v)] for v in got])
    beyond = 0
    for gid in np.unique(gg):
        c = codes[gg == gid]
        i, j = np.triu_indices(len(c), 1)
        d = np.bitwise_count(c[i] ^ c[j]).sum(axis=1)
        labels = connected_components(len(c), i[d <= radius], j[d <= radius])
        beyond += int(len(np.unique(labels)) > 1)
    return {"groups": int(len(np.unique(gg))), "beyond_radius": beyond}


def contamination(g: np.ndarray, role: np.ndarray, uids: np.ndarray, dropped: dict[int, int]) -> dict:
    """Pool rows of copy groups that hold an evaluation image must all be dropped."""
    from curation import schema

    tainted = np.zeros(int(g.max()) + 1, bool)
    tainted[g[role == schema.EXCLUDE]] = True
    pool = role == schema.POOL
    size = np.bincount(g)[g]
    expected = pool & tainted[g] & (size > 1)
    was = np.array([int(u) in dropped for u in uids])
    return {
        "contaminated_groups": int(len(np.unique(g[expected]))),
        "expected_drops": int(expected.sum()),
        "recovered": int((was & expected).sum()),
        "drops": int(was.sum()),
        "unplanted_rows_dropped": int((was & pool & ~expected).sum()),
    }


def drive(run_dir: Path, seed: int, address: str | None, stages: list[str]) -> dict:
    """The pipeline driver of one run: every stage through the executor, partitioned. Nothing
    but the run's own bookkeeping lives in this process, so its peak RSS is the driver's."""
    import ray

    from curation.config import ExecutionConfig
    from curation.executor import RayExecutor
    from curation.partitioned.monitor import TaskMonitor
    from curation.shard_ops import StageSpec
    from curation.stage import StageContext, stage_class
    from curation.store import GLOBAL, RunStore, StageRecord

    monitor = TaskMonitor(interval=0.05).start()
    base = StageRecord(**json.loads((run_dir / "ingest.json").read_text()))
    if address:
        ray.init(address=address, log_to_driver=False, configure_logging=False)
    else:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    store = RunStore(run_dir)
    execution = ExecutionConfig(global_stages="partitioned")
    out: dict = {"stages": {}}
    for i, kind in enumerate(stages, start=1):
        cls = stage_class(kind)
        cfg = cls.Config.model_validate({"kind": kind, **STAGES[kind]})
        rec = StageRecord(i, cfg.stage_name, kind, GLOBAL, [])
        ctx = StageContext(run_dir=run_dir, stage_dir=store.stage_dir(rec), seed=seed)
        spec = StageSpec(kind, cfg.model_dump(mode="json"), ctx.to_dict(), rec.to_dict(), [base.to_dict()])
        t1 = time.perf_counter()
        stats = RayExecutor(store, execution).global_stage(spec.stage(), spec)
        steps = stats["steps"]
        out["stages"][kind] = {
            "dir": str(store.stage_dir(rec)),
            "wall_seconds": round(time.perf_counter() - t1, 2),
            "largest_task_peak_rss_mb": max(s["peak_rss_mb_max"] for s in steps),
            "largest_task_step": max(steps, key=lambda s: s["peak_rss_mb_max"])["step"],
            "steps": steps,
            "summary": stats["summary"],
            "nodes": sorted({nd for s in steps for nd in s["nodes"]}),
        }
    ray.shutdown()
    out["driver_peak_rss_mb"] = monitor.stop()["peak_rss_mb"]
    return out


def evaluate(run_dir: Path, result: dict) -> None:
    """Planted groups recovered per stage, and a digest of every stage's drops."""
    from curation import schema

    p = np.load(run_dir / "planted.npz")
    role, uids, pool = p["role"], p["uids"], p["role"] == schema.POOL
    for kind, s in result["stages"].items():
        stage_dir = Path(s.pop("dir"))
        dropped = read_drops(stage_dir)
        if kind == "exact_dedup":
            rec = recovery(np.unique(p["ids"], return_inverse=True)[1].reshape(-1), uids, pool, dropped)
        elif kind == "phash_dedup":
            rec = recovery(p["hash_group"], uids, pool, dropped)
        elif kind == "pca_hash":
            g = p["copy_group"]
            in_copy_group = np.bincount(g)[g] > 1  # copies caught as well are no false drops
            planted = np.where(p["reencode"], g, np.arange(len(uids)) + g.max() + 1)
            rec = recovery(planted, uids, pool, dropped, in_copy_group)
            rec["not_recovered_beyond_radius"] = beyond_radius(run_dir, stage_dir, planted, uids, pool, dropped, STAGES[kind]["radius"])
        elif kind == "copy_dedup":
            rec = recovery(p["copy_group"], uids, pool, dropped)
        else:
            rec = contamination(p["copy_group"], role, uids, dropped)
        s["recovery"] = rec
        s["drops_digest"] = digest(stage_dir)
    result["eval_rows"] = int((role == schema.EXCLUDE).sum())
    result["run_dir_gb"] = round(sum(f.stat().st_size for f in run_dir.rglob("*") if f.is_file()) / 2**30, 3)


# ---------------------------------------------------------------------------------------------
# Parent: sizes, the two-node cluster, the table
# ---------------------------------------------------------------------------------------------
def _python(args_: list[str], env: dict | None = None) -> str:
    proc = subprocess.run([sys.executable, __file__, *args_], capture_output=True, text=True, env=env or os.environ.copy())
    if proc.returncode != 0:
        raise RuntimeError(f"{args_[:2]} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return proc.stdout


def run_one(args, n: int, address: str | None = None, env: dict | None = None) -> dict:
    """Generate (one process), drive (a fresh driver process), evaluate (here), clean up."""
    run_dir = args.work / f"run-{n}{'-cluster' if address else ''}"
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    _python(["--generate", str(n), "--run-dir", str(run_dir), "--shard-rows", str(args.shard_rows), "--seed", str(args.seed), "--dim", str(args.dim)])
    generated = time.perf_counter() - t0
    cmd = ["--drive", str(run_dir), "--seed", str(args.seed), "--stages", *args.stages]
    if address:
        cmd += ["--address", address]
    out = _python(cmd, env)
    result = json.loads(next(ln for ln in reversed(out.splitlines()) if ln.startswith("{")))
    result.update({"n": n, "generate_seconds": round(generated, 1)})
    evaluate(run_dir, result)
    shutil.rmtree(run_dir, ignore_errors=True)
    return result


def two_node(args, n: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from tests.test_jobs_cluster import LocalCluster

    root = Path(tempfile.mkdtemp(prefix="scale-cluster-"))
    cluster = LocalCluster(root).start()
    try:
        env = {**cluster.env, "PYTHONPATH": str(ROOT)}
        return run_one(args, n, address=f"127.0.0.1:{cluster.gcs_port}", env=env)
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


def print_table(runs: list[dict], stages: list[str]) -> None:
    print(f"{'stage':<14} {'N':>9} {'wall s':>8} {'task RSS MB':>11} {'driver MB':>9} {'groups ok':>15} {'unplanted':>9} {'recall@64':>9} {'search/exact':>12}")
    for r in runs:
        for kind in stages:
            s = r["stages"][kind]
            rec = s["recovery"]
            ok = f"{rec['recovered']}/{rec.get('planted_groups', rec.get('expected_drops'))}"
            summ = s["summary"]
            recall = summ.get("recall_at_64")
            exact = summ.get("exact_search_seconds_estimate")
            ratio = f"{summ['search_seconds'] / exact:.3f}" if exact else "-"
            print(f"{kind:<14} {r['n']:>9} {s['wall_seconds']:>8.1f} {s['largest_task_peak_rss_mb']:>11.0f} {r['driver_peak_rss_mb']:>9.0f} {ok:>15} {rec['unplanted_rows_dropped']:>9} {recall if recall is not None else '-':>9} {ratio:>12}")


def scaling(runs: list[dict], stages: list[str]) -> dict:
    a, b = runs[0], runs[-1]
    nlogn = (b["n"] * math.log(b["n"])) / (a["n"] * math.log(a["n"]))
    out = {"n_from": a["n"], "n_to": b["n"], "n_ratio": b["n"] / a["n"], "n_log_n_ratio": round(nlogn, 3), "stages": {}}
    for kind in stages:
        sa, sb = a["stages"][kind], b["stages"][kind]
        out["stages"][kind] = {
            "largest_task_rss_ratio": round(sb["largest_task_peak_rss_mb"] / sa["largest_task_peak_rss_mb"], 3),
            "wall_ratio": round(sb["wall_seconds"] / sa["wall_seconds"], 3),
            "wall_ratio_over_n_log_n_ratio": round(sb["wall_seconds"] / sa["wall_seconds"] / nlogn, 3),
        }
    out["driver_rss_ratio"] = round(b["driver_peak_rss_mb"] / a["driver_peak_rss_mb"], 3)
    return out


def projection(run: dict, stages: list[str], images: float = 1.2e9, node_cores: int = 64, node_memory_gb: float = 256) -> dict:
    """What deduplicating ``images`` takes, from the largest run's measured figures: core-seconds
    per image per stage (wall x this machine's cores / N; every stage is linear in N at fixed
    settings), the largest task's memory (bounded, so a node runs one task per core if the memory
    allows), and the run directory's bytes per image (inputs plus every shuffle)."""
    cores = os.cpu_count() or 1
    per_image = {k: run["stages"][k]["wall_seconds"] * cores / run["n"] for k in stages}
    task_gb = max(run["stages"][k]["largest_task_peak_rss_mb"] for k in stages) / 1024
    tasks_per_node = max(1, min(node_cores, int(node_memory_gb // max(task_gb, 1e-3))))
    core_hours = sum(per_image.values()) * images / 3600
    return {
        "images": images,
        "from_n": run["n"],
        "core_seconds_per_million_images": {k: round(v * 1e6, 1) for k, v in per_image.items()},
        "core_hours": round(core_hours),
        "node": {"cores": node_cores, "memory_gb": node_memory_gb, "tasks_at_once": tasks_per_node},
        "hours_on_10_nodes": round(core_hours / (10 * tasks_per_node), 2),
        "hours_on_100_nodes": round(core_hours / (100 * tasks_per_node), 2),
        "largest_task_gb": round(task_gb, 2),
        "disk_tb": round(run["run_dir_gb"] / run["n"] * images / 1024, 1),
        "note": "CPU figures of this machine (2 cores); the k-NN search, which dominates, runs 1-2 orders of magnitude faster on a GPU",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 20k and 40k")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--two-node", action="store_true", help="also run the smallest N on a loopback two-node cluster")
    ap.add_argument("--shard-rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=DIM, help="descriptor dimension (float16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-measured", action="store_true",
                    help="reuse the sizes (and the two-node run) already in the result JSON when it was made with the same settings; "
                    "the 4M run alone takes hours on 2 cores, so a benchmark may span sessions (each run records its own date and commit)")
    ap.add_argument("--stages", nargs="*", default=list(STAGES))
    ap.add_argument("--remeasure", nargs="*", default=[],
                    help="with --keep-measured: run these stages again at every kept size and replace their figures "
                    "(each stage records its own date and commit, and whether its drops equal the earlier measurement's)")
    ap.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "curation-scale")
    ap.add_argument("--generate", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--drive", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--run-dir", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--address", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate is not None:
        write_shards(args.run_dir, args.generate, args.shard_rows, args.seed, args.dim)
        return
    if args.drive is not None:
        print(json.dumps(drive(args.drive, args.seed, args.address, args.stages)))
        return
    sizes = args.sizes or ([20_000, 40_000] if args.quick else [500_000, 4_000_000, 1_000_000, 2_000_000])
    if args.quick:
        args.shard_rows = min(args.shard_rows, 5_000)
    args.work.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": "scale", "cpus": os.cpu_count(), "dim": args.dim, "stage_configs": STAGES, "shard_rows": args.shard_rows, "runs": []}
    if args.keep_measured:
        report.update(measured_before(report, args.quick, args.remeasure))
        sizes = [n for n in sizes if n not in {r["n"] for r in report["runs"]}]
        print(f"kept from the result file: N = {[r['n'] for r in report['runs']]}; to run: {sizes}", flush=True)
        if args.remeasure and report["runs"]:
            remeasure(args, report)
    # Sizes run smallest, largest, then the middle ones, and the report is rewritten after
    # each, so an interrupted benchmark still leaves the two ends the scaling figures need.
    for n in sizes:
        t0 = time.perf_counter()
        run = run_one(args, n)
        run["measured"] = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()}
        report["runs"] = sorted([*report["runs"], run], key=lambda r: r["n"])
        print(f"N={n}: {time.perf_counter() - t0:.0f} s", flush=True)
        if args.two_node and "two_node" not in report:
            report["two_node"] = two_node_report(args, report["runs"][0])
        summarise(report, args)
        write_result("scale", report, quick=args.quick)


def remeasure(args, report: dict) -> None:
    """Run ``args.remeasure`` again at every kept size (smallest, largest, then the middle ones)
    and replace those stages' figures, writing the report after each size."""
    again = argparse.Namespace(**{**vars(args), "stages": args.remeasure})
    runs = sorted(report["runs"], key=lambda r: r["n"])
    for run in [runs[0], runs[-1], *runs[1:-1]]:
        t0 = time.perf_counter()
        new = run_one(again, run["n"])
        for kind in args.remeasure:
            before = run["stages"].get(kind, {}).get("drops_digest")
            run["stages"][kind] = {**new["stages"][kind], "driver_peak_rss_mb": new["driver_peak_rss_mb"],
                                   "measured": {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()},
                                   "drops_identical_to_previous_measurement": before == new["stages"][kind]["drops_digest"]}
        print(f"N={run['n']}: {args.remeasure} measured again in {time.perf_counter() - t0:.0f} s", flush=True)
        summarise(report, args)
        write_result("scale", report, quick=args.quick)
    if args.two_node and "two_node" in report:  # the same stages again on the two-node cluster
        fresh = two_node_report(again, runs[0])
        for key in ("identical_to_one_node", "step_nodes"):
            report["two_node"][key].update(fresh[key])
        report["two_node"]["run"]["stages"].update(fresh["run"]["stages"])
        report["two_node"].setdefault("measured_again", {}).update(
            {k: {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": git_commit()} for k in args.remeasure})
        write_result("scale", report, quick=args.quick)


def measured_before(report: dict, quick: bool, remeasured: list[str] = ()) -> dict:
    """Runs (and the two-node run) of an earlier result file made with the same settings
    (those of the ``remeasured`` stages excepted)."""
    path = RESULTS / f"scale-{device_name()}{'-quick' if quick else ''}.json"
    if not path.exists():
        return {}
    old = json.loads(path.read_text())
    same = all(json.dumps(old.get(k), sort_keys=True) == json.dumps(report[k], sort_keys=True) for k in ("cpus", "dim", "shard_rows"))
    # A stage measured again may change its settings; every other stage must keep them.
    kept = [k for k in report["stage_configs"] if k not in remeasured]
    same = same and all(json.dumps(old.get("stage_configs", {}).get(k), sort_keys=True) == json.dumps(report["stage_configs"][k], sort_keys=True) for k in kept)
    if not same:
        print(f"{path.name} was made with other settings: measuring every size again", flush=True)
        return {}
    for run in old["runs"]:
        run.setdefault("measured", {"date": old.get("date"), "commit": old.get("commit")})
    return {k: old[k] for k in ("runs", "two_node") if k in old}


def two_node_report(args, one_node: dict) -> dict:
    t0 = time.perf_counter()
    cluster_run = two_node(args, one_node["n"])
    same = {k: cluster_run["stages"][k]["drops_digest"] == one_node["stages"][k]["drops_digest"] for k in args.stages}
    nodes = {k: [(s["step"], s["nodes"]) for s in cluster_run["stages"][k]["steps"]] for k in args.stages}
    print("two-node cluster: identical drops per stage:", same)
    print("nodes per stage:", {k: cluster_run["stages"][k]["nodes"] for k in args.stages})
    return {"n": one_node["n"], "identical_to_one_node": same, "step_nodes": nodes, "run": cluster_run,
            "seconds": round(time.perf_counter() - t0, 1)}


def summarise(report: dict, args) -> None:
    runs = report["runs"]
    print_table(runs, args.stages)
    if len(runs) >= 2:
        report["scaling"] = scaling(runs, args.stages)
        print(json.dumps(report["scaling"], indent=1))
    report["projection_1_2_billion"] = projection(runs[-1], args.stages)
    print(json.dumps(report["projection_1_2_billion"], indent=1))


if __name__ == "__main__":
    main()
