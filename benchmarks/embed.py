"""Retrieval embedding throughput and pool-scale k-means / k-NN.

1. **embed**: real JPEGs (../shared/data seeds_imagenet + pool_caltech101, read into memory
   first) through the whole ``embed`` stage (decode + preprocess in threads overlapped with the
   model, float16 Arrow output) versus the bare model forward pass on random tensors of the same
   batch size, same model, same run. The ratio stage/raw says how much the input pipeline costs
   (target >= 0.85 on a GPU with ViT-L/14 and ViT-H/14).
2. **kmeans**: ``retrieval.kmeans`` on N clustered unit vectors (default 1M).
3. **knn**: ``retrieval.index.knn_search`` top-k over the same N vectors (auto index: IVF-SQ8 at
   1M on CPU, exact on GPU), with recall@k against exact search on a query subset.

Models are random-init (throughput does not depend on the weights), so this runs offline.

    .venv/bin/python benchmarks/embed.py --quick            # CPU, ViT-T, 100k vectors
    .venv/bin/python benchmarks/embed.py                    # CPU, ViT-S, 1M vectors
    .venv/bin/python benchmarks/embed.py --gpu-models       # on a GPU: ViT-L/14 and ViT-H/14
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from common import device_name, git_commit  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))

GPU_MODELS = ["vit_large_patch14_dinov2.lvd142m", "vit_huge_patch14_gap_224.in22k_ijepa"]






def read_jpegs(limit: int) -> list[bytes]:
    files = sorted((DATA / "seeds_imagenet").glob("*.JPEG")) + sorted((DATA / "pool_caltech101").rglob("*.jpg"))
    if not files:
        raise SystemExit(f"no images under {DATA}")
    return [files[i % len(files)].read_bytes() for i in range(limit)]


def bench_embed(model: str, images: int, batch_size: int, img_size: int | None, threads: int, repeats: int = 3) -> dict:
    import pyarrow as pa
    import torch

    from curation.stage import StageContext
    from curation.stages.embed import STAGE, EmbedConfig

    spec = {"type": "timm", "name": model.split(".")[0], "pretrained": False}
    if img_size:
        spec["img_size"] = img_size
    cfg = EmbedConfig(kind="embed", model=spec, batch_size=batch_size, rows_per_call=images, decode_threads=threads, prefetch=2)
    stage = STAGE(cfg, StageContext(run_dir=Path("/tmp"), stage_dir=Path("/tmp"), cluster_cpus=os.cpu_count() or 1))
    stage.setup()
    emb = stage.embedder
    blobs = read_jpegs(images)
    table = pa.table({"uid": pa.array(range(images), pa.int64()), "bytes": pa.array(blobs, pa.binary())})
    shape = (batch_size, *emb.data_config["input_size"])
    sync = torch.cuda.synchronize if emb.device.type == "cuda" else (lambda: None)

    # Warm-up both paths (cuDNN autotuning, allocator, thread pools).
    emb.forward_batch(torch.randn(*shape))
    stage.process(table.slice(0, min(images, 2 * batch_size)))

    n_batches = max(1, images // batch_size)
    x = torch.randn(*shape)
    raw_times, stage_times = [], []
    for _ in range(repeats):  # interleaved, so drift in machine load hits both paths alike
        sync()
        t0 = time.perf_counter()
        for _ in range(n_batches):
            emb.forward_batch(x)
        sync()
        raw_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out = stage.process(table)
        sync()
        stage_times.append(time.perf_counter() - t0)
    raw_ips = n_batches * batch_size / float(np.median(raw_times))
    kept = out.column("drop_reason").null_count
    stage_ips = images / float(np.median(stage_times))
    return {
        "model": model,
        "input_size": list(emb.data_config["input_size"]),
        "device": str(emb.device),
        "batch_size": batch_size,
        "images": images,
        "embedded": kept,
        "decode_threads": threads,
        "repeats": repeats,
        "torch_threads": torch.get_num_threads(),
        "raw_forward_seconds": [round(t, 3) for t in raw_times],
        "stage_seconds": [round(t, 3) for t in stage_times],
        "raw_forward_images_per_s": round(raw_ips, 2),
        "stage_images_per_s": round(stage_ips, 2),
        "ratio_stage_over_raw": round(stage_ips / raw_ips, 3),
    }


def clustered_vectors(n: int, dim: int, concepts: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((concepts, dim)).astype(np.float32)
    x = np.empty((n, dim), np.float32)
    step = 100_000
    for s in range(0, n, step):
        m = min(step, n - s)
        x[s : s + m] = centres[rng.integers(concepts, size=m)] + 0.7 * rng.standard_normal((m, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def bench_kmeans(x: np.ndarray, k: int, niter: int) -> dict:
    from retrieval.kmeans import kmeans

    r = kmeans(x, k, niter=niter, seed=0)
    sizes = r.sizes()
    return {
        "n": len(x), "dim": x.shape[1], "k": k, "niter": niter, "backend": r.backend,
        "seconds": round(r.seconds, 2), "points_per_s": round(len(x) / r.seconds, 1),
        "mean_similarity_to_centroid": round(float(r.scores.mean()), 4),
        "cluster_size_min_max": [int(sizes.min()), int(sizes.max())],
    }


def bench_knn(x: np.ndarray, queries: int, k: int, spec: str) -> dict:
    from retrieval.index import KnnIndex, SearchParams

    rng = np.random.default_rng(1)
    q = x[rng.choice(len(x), queries, replace=False)] + 0.05 * rng.standard_normal((queries, x.shape[1])).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = KnnIndex(dim=x.shape[1], spec=spec, params=SearchParams(nprobe=32))
    t0 = time.perf_counter()
    index.add(x)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, ids = index.search(q, k)
    search_s = time.perf_counter() - t0
    sub = min(200, queries)  # exact answers for a subset, by brute force
    exact = np.argsort(-(q[:sub] @ x.T), axis=1)[:, :k]
    recall = np.mean([len(set(a) & set(b)) / k for a, b in zip(ids[:sub].tolist(), exact.tolist())])
    return {
        "n": len(x), "dim": x.shape[1], "queries": queries, "k": k, **index.describe(),
        "build_seconds": round(build_s, 2), "search_seconds": round(search_s, 2),
        "queries_per_s": round(queries / search_s, 1), f"recall_at_{k}": round(float(recall), 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="ViT-T, 256 images, 100k vectors")
    ap.add_argument("--models", nargs="*", default=None, help="timm model names (random init)")
    ap.add_argument("--gpu-models", action="store_true", help=f"benchmark {GPU_MODELS} (for a lent GPU)")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--img-size", type=int, default=None, help="override input resolution (CPU runs)")
    ap.add_argument("--threads", type=int, default=0, help="decode threads (0 = all CPUs)")
    ap.add_argument("--vectors", type=int, default=None, help="N for k-means and k-NN (default 1M, quick 100k)")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--clusters", type=int, default=None)
    ap.add_argument("--knn-spec", default="auto")
    ap.add_argument("--skip", nargs="*", default=[], choices=["embed", "kmeans", "knn"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import torch

    gpu = torch.cuda.is_available()
    models = args.models or (GPU_MODELS if args.gpu_models else ["vit_tiny_patch16_224" if args.quick else "vit_small_patch16_224"])
    images = args.images or (256 if args.quick else (4096 if gpu else 512))
    batch = args.batch_size or (128 if gpu else 32)
    n = args.vectors or (100_000 if args.quick else 1_000_000)
    clusters = args.clusters or max(2, n // 1000)
    threads = args.threads or os.cpu_count() or 1

    report: dict = {
        "benchmark": "embed",
        "device": device_name(),
        "cpus": os.cpu_count(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    if "embed" not in args.skip:
        report["embed"] = []
        print(f"{'model':42s} {'input':>9s} {'raw img/s':>10s} {'stage img/s':>12s} {'ratio':>6s}")
        for m in models:
            r = bench_embed(m, images, batch, args.img_size, threads)
            report["embed"].append(r)
            print(f"{m:42s} {r['input_size'][1]:>4d}x{r['input_size'][2]:<4d} {r['raw_forward_images_per_s']:>10.1f} {r['stage_images_per_s']:>12.1f} {r['ratio_stage_over_raw']:>6.3f}")
    if "kmeans" not in args.skip or "knn" not in args.skip:
        t0 = time.perf_counter()
        x = clustered_vectors(n, args.dim, concepts=max(2, n // 2000))
        print(f"generated {n} x {args.dim} vectors in {time.perf_counter() - t0:.1f} s")
        if "kmeans" not in args.skip:
            r = report["kmeans"] = bench_kmeans(x, clusters, niter=10 if args.quick else 20)
            print(f"k-means  n={n} k={clusters} {r['backend']}: {r['seconds']} s ({r['points_per_s']:.0f} points/s)")
        if "knn" not in args.skip:
            r = report["knn"] = bench_knn(x, queries=10_000 if not args.quick else 2_000, k=4, spec=args.knn_spec)
            print(f"k-NN     n={n} {r['spec']} ({r['backend']}): build {r['build_seconds']} s, "
                  f"{r['queries_per_s']:.0f} queries/s, recall@4 {r['recall_at_4']}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"embed-{report['device']}{'-quick' if args.quick else ''}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    main()
