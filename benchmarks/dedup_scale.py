"""Copy-detection dedup at scale: k-NN graph (k=64, cosine > 0.6) + connected components.

Synthetic L2-normalised descriptors with planted duplicate groups (``curation.dedup.synthetic``:
~20% of rows are extra copies in groups of 2-5) at N = 100k and 1M by default. Each
(N, index spec) runs in a fresh process so its peak RSS is its own; reported per run:

* seconds for the index build, the thresholded k-NN graph, the components (the work of the
  ``copy_dedup`` stage, through the same library code);
* peak RSS and the size of the descriptor matrix itself (memory must stay linear in N);
* recall@k of the index against exact search on sampled queries;
* how exactly the planted groups were recovered: merges (a component spanning several planted
  groups) and splits (a planted group spread over components), 0 and 0 when exact.

    .venv/bin/python benchmarks/dedup_scale.py --quick              # 20k and 100k
    .venv/bin/python benchmarks/dedup_scale.py                      # 100k and 1M, auto index
    .venv/bin/python benchmarks/dedup_scale.py --sizes 1000000 10000000 --specs Flat   # on a GPU
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
from common import device_name, git_commit  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_gb() -> float:
    try:
        import psutil

        return psutil.Process().memory_info().rss / 2**30
    except ImportError:
        return float("nan")


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def one_run(n: int, dim: int, spec: str, k: int, threshold: float, recall_queries: int, nprobe: int, seed: int) -> dict:
    """Runs in a child process: generate, build, search, components, measure."""
    from curation.dedup.components import connected_components
    from curation.dedup.knn_graph import IndexOptions, knn_edges
    from curation.dedup.synthetic import planted_groups
    from retrieval.index import KnnIndex, SearchParams, resolve_backend

    import faiss  # after retrieval set OMP_WAIT_POLICY

    resolve_backend()  # imports torch to look for CUDA: part of the baseline, not of N
    rss_baseline = rss_gb()
    t0 = time.perf_counter()
    planted = planted_groups(n, dim, seed=seed)
    x = planted.x
    gen_s = time.perf_counter() - t0
    rss_data = rss_gb()
    options = IndexOptions(spec=spec, nprobe=nprobe, seed=seed)
    t0 = time.perf_counter()
    graph = knn_edges(x, k, threshold, options)
    graph_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    labels = connected_components(n, graph.src, graph.dst)
    comp_s = time.perf_counter() - t0
    peak = peak_rss_gb()

    # Planted-group recovery: distinct (component, group) combinations.
    combos = np.unique(labels.astype(np.int64) * (planted.group.max() + 1) + planted.group)
    comp_of, group_of = combos // (planted.group.max() + 1), combos % (planted.group.max() + 1)
    merges = int(len(combos) - len(np.unique(comp_of)))
    splits = int(len(combos) - len(np.unique(group_of)))
    expected_dropped = int(n - len(np.unique(planted.group)))
    dropped = int(n - len(np.unique(labels)))

    # recall@k of the index against exact search on sampled queries.
    rng = np.random.default_rng(seed)
    q_idx = rng.choice(n, size=min(recall_queries, n), replace=False)
    flat = faiss.IndexFlatIP(dim)
    flat.add(x)
    _, exact_ids = flat.search(x[q_idx], k)
    del flat
    index = KnnIndex(dim=dim, spec=spec, params=SearchParams(nprobe=nprobe), seed=seed).add(x)
    _, ids = index.search(x[q_idx], k)
    recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(ids, exact_ids)]))
    return {
        "n": n,
        "dim": dim,
        "k": k,
        "threshold": threshold,
        "spec_requested": spec,
        "index": graph.index,
        "generate_seconds": round(gen_s, 2),
        "graph_seconds": round(graph_s, 2),
        "components_seconds": round(comp_s, 3),
        "dedup_seconds": round(graph_s + comp_s, 2),
        "edges": graph.num_edges,
        "dropped": dropped,
        "expected_dropped": expected_dropped,
        "merges": merges,
        "splits": splits,
        f"recall_at_{k}_vs_exact": round(recall, 4),
        "recall_queries": int(len(q_idx)),
        "descriptor_gb": round(x.nbytes / 2**30, 3),
        "rss_baseline_gb": round(rss_baseline, 3),
        "rss_after_data_gb": round(rss_data, 3),
        "peak_rss_gb": round(peak, 3),
        "nprobe": nprobe,
    }


def _child(conn, kwargs):
    try:
        conn.send(one_run(**kwargs))
    except Exception as e:  # report, don't hang the parent
        conn.send({"error": f"{type(e).__name__}: {e}", **kwargs})
    conn.close()


def run_isolated(**kwargs) -> dict:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(child, kwargs))
    proc.start()
    result = parent.recv()
    proc.join()
    return result






def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="N = 20k and 100k")
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--specs", nargs="*", default=["auto"], help="index_factory strings or auto")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--threshold", type=float, default=0.6)
    ap.add_argument("--nprobe", type=int, default=32)
    ap.add_argument("--recall-queries", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    sizes = args.sizes or ([20_000, 100_000] if args.quick else [100_000, 1_000_000])

    report = {
        "benchmark": "dedup_scale",
        "device": device_name(),
        "cpus": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    print(f"{'N':>9s} {'index':24s} {'backend':8s} {'dedup s':>8s} {'recall@k':>8s} {'dropped':>8s} {'expected':>8s} {'merge':>5s} {'split':>5s} {'data GB':>7s} {'base GB':>7s} {'peak GB':>7s}")
    for n in sizes:
        for spec in args.specs:
            r = run_isolated(n=n, dim=args.dim, spec=spec, k=args.k, threshold=args.threshold,
                             recall_queries=args.recall_queries, nprobe=args.nprobe, seed=args.seed)
            report["runs"].append(r)
            if "error" in r:
                print(f"{n:>9d} {spec:24s} ERROR {r['error']}")
                continue
            print(f"{n:>9d} {r['index']['spec']:24s} {r['index']['backend']:8s} {r['dedup_seconds']:8.1f} {r[f'recall_at_{args.k}_vs_exact']:8.4f} "
                  f"{r['dropped']:8d} {r['expected_dropped']:8d} {r['merges']:5d} {r['splits']:5d} {r['descriptor_gb']:7.3f} {r['rss_baseline_gb']:7.3f} {r['peak_rss_gb']:7.3f}")
    ok = [r for r in report["runs"] if "error" not in r]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        report["memory_scaling"] = {
            "n_ratio": b["n"] / a["n"],
            "peak_rss_above_baseline_ratio": round((b["peak_rss_gb"] - b["rss_baseline_gb"]) / max(1e-9, a["peak_rss_gb"] - a["rss_baseline_gb"]), 3),
        }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"dedup_scale-{report['device']}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
