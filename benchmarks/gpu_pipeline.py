"""Issue 16's GPU measurements in one process: embed with CPU vs GPU decoding, the k-NN graph,
and the safety stages, each against its bare model or a naive baseline, in the same run.

The GPU machine has torch, torchvision, timm, pyarrow, Pillow, OpenCV and scipy but no Ray,
faiss or pydantic, and no ../shared/data, so this script calls the stages' classes directly on
Parquet shards that ``prepare`` writes from real photos, and ``gpu_pipeline.sh`` installs the
missing small packages from carried wheels (pydantic for the stage configs, faiss-cpu for
``retrieval.index``, facenet-pytorch, keras + opennsfw2 for the safety stages).

* **embed** (ViT-S/14, ViT-B/16, ViT-L/14 at 224 px, random init, bf16): the ``embed`` stage end
  to end over the shards (Parquet read, decode, preprocess, forward, Arrow output) with CPU
  decoding (Pillow in ``--threads`` threads) and with GPU decoding (nvJPEG), against the bare
  forward pass on pre-made device tensors; interleaved rounds, GPU utilisation sampled with
  NVML. Where the time goes: Parquet reads, CPU decode + preprocess alone, GPU decode +
  preprocess alone, host-to-device copies of a pinned batch. Embedding cosine between the
  two decode paths on the same images.
* **knn** (synthetic d=256 descriptors with planted copy groups, ``curation.dedup.synthetic``;
  k = 64, cosine > 0.6, ``curation.dedup.knn_graph.knn_edges``): the torch exact GPU path, the
  faiss-cpu IVF path on the machine's cores, and a naive exact baseline (one fp16 matmul +
  topk per query chunk). Seconds, peak GPU memory, recall@64 against exact search on sampled
  queries, and planted groups recovered when the whole graph is built. A method whose first
  query chunks say the whole graph would exceed ``--knn-budget`` seconds reports that estimate
  instead of running on.
* **safety**: ``benchmarks/safety.py``'s NSFW and face-blur measurements on the shards' photos.

    python benchmarks/gpu_pipeline.py prepare --out .gpu_data          # here, from ../shared/data
    python benchmarks/gpu_pipeline.py all --data .gpu_data --out $OUT  # there (gpu_pipeline.sh run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import DATA, ROOT, write_result  # noqa: E402

EMBED_MODELS = {
    "ViT-S/14": {"type": "timm", "name": "vit_small_patch14_dinov2", "pretrained": False, "img_size": 224},
    "ViT-B/16": {"type": "timm", "name": "vit_base_patch16_224", "pretrained": False},
    "ViT-L/14": {"type": "timm", "name": "vit_large_patch14_dinov2", "pretrained": False, "img_size": 224},
}


# -- data --------------------------------------------------------------------------------------
def prepare(out: Path, imagenet: int, caltech: int, rows_per_shard: int = 200) -> None:
    """Real JPEGs as Parquet shards (uid, role, bytes), small enough to travel (~64 MiB limit)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted((DATA / "seeds_imagenet").glob("*.JPEG"))[:imagenet] + sorted((DATA / "pool_caltech101").rglob("*.jpg"))[::3][:caltech]
    files += sorted((DATA / "faces").rglob("*.jpg"))
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("part-*.parquet"):
        old.unlink()
    order = np.random.default_rng(0).permutation(len(files))  # ImageNet, Caltech and faces mixed
    files = [files[i] for i in order]
    for s in range(0, len(files), rows_per_shard):
        chunk = files[s : s + rows_per_shard]
        pq.write_table(
            pa.table({"uid": pa.array(range(s, s + len(chunk)), pa.int64()), "role": ["pool"] * len(chunk), "bytes": pa.array([f.read_bytes() for f in chunk], pa.binary())}),
            out / f"part-{s // rows_per_shard:05d}.parquet",
        )
    from common import git_commit

    (out / "commit.txt").write_text(git_commit() + "\n")
    size = sum(p.stat().st_size for p in out.glob("*.parquet"))
    print(f"wrote {len(files)} photos in {len(list(out.glob('*.parquet')))} shards, {size / 2**20:.1f} MiB, to {out}")


def shard_paths(data: Path) -> list[Path]:
    paths = sorted(data.glob("part-*.parquet"))
    if not paths:
        raise SystemExit(f"no shards in {data}: run `gpu_pipeline.py prepare` (or gpu_pipeline.sh prepare) first")
    return paths


def tables(paths: list[Path], images: int, rows: int):
    """Tables of ``rows`` rows read from the shards, cycling through them until ``images``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    buffer, done = None, 0
    while True:
        for p in paths:
            table = pq.read_table(p)
            buffer = table if buffer is None else pa.concat_tables([buffer, table])
            while buffer.num_rows >= rows or done + buffer.num_rows >= images:
                take = min(rows, images - done)
                yield buffer.slice(0, take)
                done += take
                buffer = buffer.slice(take)
                if done >= images:
                    return


def all_blobs(paths: list[Path]) -> list[bytes]:
    import pyarrow.parquet as pq

    return [b for p in paths for b in pq.read_table(p, columns=["bytes"]).column("bytes").to_pylist()]


# -- GPU utilisation ---------------------------------------------------------------------------
class Utilisation:
    """Mean GPU utilisation (NVML, every 50 ms) while the block runs; None without NVML."""

    def __enter__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:
            self._thread = None
            return self

        def sample():
            while not self._stop.is_set():
                self.samples.append(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
                time.sleep(0.05)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(float(np.mean(self.samples)), 1) if self.samples else None


# -- embed -------------------------------------------------------------------------------------
def embed_stage(spec: dict, gpu_decode: str, batch: int, rows: int, threads: int, tmp: Path):
    import torch

    from curation.stage import StageContext
    from curation.stages.embed import STAGE, EmbedConfig

    cfg = EmbedConfig.model_validate({"kind": "embed", "model": spec, "batch_size": batch, "rows_per_call": rows, "decode_threads": threads,
                                      "cpus_per_worker": threads, "prefetch": 2, "gpu_decode": gpu_decode, "dtype": "float16"})
    stage = STAGE(cfg, StageContext(run_dir=tmp, stage_dir=tmp / gpu_decode, cluster_cpus=os.cpu_count() or 1, cluster_gpus=torch.cuda.device_count()))
    torch.manual_seed(0)  # both stages get the same random weights
    stage.setup()
    return stage


def bench_embed(paths: list[Path], name: str, spec: dict, images: int, batch: int, threads: int, rounds: int, tmp: Path) -> dict:
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rows = 8 * batch
    cpu = embed_stage(spec, "never", batch, rows, threads, tmp)
    gpu = embed_stage(spec, "always", batch, rows, threads, tmp)
    emb = cpu.embedder
    x = torch.randn(batch, *emb.data_config["input_size"], device=device)

    def bare():
        for _ in range(max(1, images // batch)):
            emb.forward_batch(x)

    def run(stage):
        def go():
            for table in tables(paths, images, rows):
                stage.process(table)
        return go

    fns = {"bare_forward": bare, "stage_cpu_decode": run(cpu), "stage_gpu_decode": run(gpu)}
    counts = {"bare_forward": max(1, images // batch) * batch, "stage_cpu_decode": images, "stage_gpu_decode": images}
    first = next(tables(paths, rows, rows))  # warm-up: cuDNN/cuBLAS plans, allocator, nvJPEG, threads
    cpu.process(first)
    gpu.process(first)
    emb.forward_batch(x)
    sync()
    seconds: dict[str, list[float]] = {k: [] for k in fns}
    util: dict[str, list] = {k: [] for k in fns}
    for r in range(rounds):
        for key in (list(fns) if r % 2 == 0 else list(reversed(fns))):
            with Utilisation() as u:
                t = time.perf_counter()
                fns[key]()
                sync()
                seconds[key].append(time.perf_counter() - t)
            util[key].append(u.mean)
    out = {"model": name, "spec": spec, "input_size": list(emb.data_config["input_size"]), "batch_size": batch, "images": images, "decode_threads": threads, "device": device}
    for key in fns:
        s = statistics.median(seconds[key])
        out[key] = {"images_per_s": round(counts[key] / s, 1), "seconds": [round(v, 3) for v in seconds[key]], "gpu_utilisation_pct": util[key]}
    bare_ips = out["bare_forward"]["images_per_s"]
    out["ratio_cpu_decode_over_bare"] = round(out["stage_cpu_decode"]["images_per_s"] / bare_ips, 3)
    out["ratio_gpu_decode_over_bare"] = round(out["stage_gpu_decode"]["images_per_s"] / bare_ips, 3)
    out["breakdown"] = embed_breakdown(paths, cpu, gpu, batch, min(images, 4 * rows), sync)
    sample = next(tables(paths, rows, rows))
    a, b = cpu.process(sample).column("embedding").to_pylist(), gpu.process(sample).column("embedding").to_pylist()
    cos = [float(np.dot(np.asarray(u, np.float32), np.asarray(v, np.float32))) for u, v in zip(a, b) if u is not None and v is not None]
    out["cosine_gpu_vs_cpu_decode"] = {"images": len(cos), "min": round(min(cos), 5), "mean": round(float(np.mean(cos)), 5)} if cos else None
    out["gpu_decode_paths"] = dict(gpu.batch_decoder.counts) if gpu.batch_decoder is not None else None
    return out


def embed_breakdown(paths, cpu, gpu, batch: int, images: int, sync) -> dict:
    """Images/s of each part alone: where the stage's time goes."""
    import torch

    out = {}
    t = time.perf_counter()
    blobs = [b for table in tables(paths, images, 8 * batch) for b in table.column("bytes").to_pylist()]
    out["parquet_read_images_per_s"] = round(len(blobs) / (time.perf_counter() - t), 1)
    t = time.perf_counter()
    prepared = list(cpu._pool.map(cpu._prepare, blobs))
    out["cpu_decode_preprocess_images_per_s"] = round(len(blobs) / (time.perf_counter() - t), 1)
    if gpu.batch_decoder is not None:
        sync()
        t = time.perf_counter()
        for s in range(0, len(blobs), batch):
            gpu.batch_decoder.prepare(blobs[s : s + batch]).wait()
        sync()
        out["gpu_decode_preprocess_images_per_s"] = round(len(blobs) / (time.perf_counter() - t), 1)
    tensors = [p for p in prepared if isinstance(p, torch.Tensor)][:batch]
    if tensors and torch.cuda.is_available():
        pinned = torch.stack(tensors).pin_memory()
        sync()
        t = time.perf_counter()
        for _ in range(20):
            pinned.to("cuda", non_blocking=True)
        sync()
        out["host_to_device_images_per_s"] = round(20 * len(tensors) / (time.perf_counter() - t), 1)
    return out


# -- k-NN graph --------------------------------------------------------------------------------
def naive_topk(x, q, k: int, chunk: int = 1024):
    """Exact top-k by one fp16 matmul + topk per query chunk (the baseline anyone would write)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    xb = torch.from_numpy(x).to(device, dtype)
    sims, ids = [], []
    for s in range(0, len(q), chunk):
        qs = torch.from_numpy(q[s : s + chunk]).to(device, dtype)
        v, i = torch.topk((qs @ xb.T).float(), k, dim=1)
        sims.append(v.cpu().numpy())
        ids.append(i.cpu().numpy())
    del xb
    return np.concatenate(sims), np.concatenate(ids)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found.tolist(), truth.tolist())]))


def bench_knn(n: int, dim: int, k: int, threshold: float, budget: float, probe_queries: int, recall_queries: int, faiss_threads: int) -> dict:
    import torch

    from curation.dedup.components import connected_components
    from curation.dedup.knn_graph import IndexOptions, knn_edges
    from curation.dedup.synthetic import planted_groups

    cuda = torch.cuda.is_available()
    t = time.perf_counter()
    data = planted_groups(n, dim, seed=0)
    out: dict = {"n": n, "dim": dim, "k": k, "threshold": threshold, "generate_seconds": round(time.perf_counter() - t, 1), "methods": {}}
    rng = np.random.default_rng(1)
    sample = rng.choice(n, min(recall_queries, n), replace=False)
    _, truth = naive_topk(data.x, data.x[sample], k + 1)
    methods = {
        "torch_exact_gpu": IndexOptions(spec="Flat", backend="torch", gpu="always" if cuda else "never"),
        "faiss_ivf_cpu": IndexOptions(spec="auto", backend="faiss", gpu="never"),
    }
    try:
        import faiss

        faiss.omp_set_num_threads(faiss_threads)
    except ImportError:
        methods.pop("faiss_ivf_cpu")
        out["methods"]["faiss_ivf_cpu"] = {"skipped": "faiss-cpu is not installed (its wheel did not travel)"}
    for name, options in methods.items():
        out["methods"][name] = knn_method(data, options, k, threshold, budget, probe_queries, sample, truth, connected_components, knn_edges)
    out["methods"]["naive_exact_gpu" if cuda else "naive_exact_cpu"] = naive_method(data, k, budget, probe_queries, sample, truth)
    return out


def _peak_reset():
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_gb() -> float | None:
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def knn_method(data, options, k, threshold, budget, probe_queries, sample, truth, connected_components, knn_edges) -> dict:
    n = len(data.x)
    _peak_reset()
    t = time.perf_counter()
    index = options.make_index(data.x.shape[1]).add(data.x)
    build = time.perf_counter() - t
    t = time.perf_counter()
    _, found = index.search(data.x[sample], k + 1)
    out = {"index": index.describe(), "build_seconds": round(build, 2), f"recall_at_{k}": round(recall_at_k(found, truth), 4)}
    probe = min(n, probe_queries)
    t = time.perf_counter()
    for _ in index.search_chunks(data.x[:probe], k + 1):
        pass
    per_query = (time.perf_counter() - t) / probe
    out["search_seconds_per_million_queries"] = round(per_query * 1e6, 2)
    estimate = build + per_query * n
    out["estimated_graph_seconds"] = round(estimate, 1)
    del index
    if estimate > budget:
        out["graph"] = f"not built: the estimate ({estimate:.0f} s) exceeds --knn-budget ({budget:.0f} s)"
    else:
        _peak_reset()
        graph = knn_edges(data.x, k, threshold, options)
        labels = connected_components(n, graph.src, graph.dst)
        out["graph"] = {"seconds": round(graph.seconds, 2), "edges": int(graph.num_edges), **planted_recovery(labels, data.group)}
    out["peak_gpu_gb"] = _peak_gb()
    return out


def naive_method(data, k, budget, probe_queries, sample, truth) -> dict:
    n = len(data.x)
    _peak_reset()
    probe = min(n, probe_queries)
    t = time.perf_counter()
    _, found = naive_topk(data.x, data.x[:probe], k + 1)
    per_query = (time.perf_counter() - t) / probe
    out = {"search_seconds_per_million_queries": round(per_query * 1e6, 2), "estimated_graph_seconds": round(per_query * n, 1)}
    _, found = naive_topk(data.x, data.x[sample], k + 1)
    out[f"recall_at_{k}"] = round(recall_at_k(found, truth), 4)
    if per_query * n <= budget:
        t = time.perf_counter()
        naive_topk(data.x, data.x, k + 1)
        out["all_queries_seconds"] = round(time.perf_counter() - t, 2)
    out["peak_gpu_gb"] = _peak_gb()
    return out


def planted_recovery(labels: np.ndarray, group: np.ndarray) -> dict:
    """Components spanning several planted groups (merges) and planted groups split apart."""
    pairs = np.unique(np.stack([labels, group], 1), axis=0)
    comps_per_group = np.bincount(np.unique(pairs[:, 1], return_inverse=True)[1])
    groups_per_comp = np.bincount(np.unique(pairs[:, 0], return_inverse=True)[1])
    return {"planted_groups_split": int(np.sum(comps_per_group > 1)), "components_merging_groups": int(np.sum(groups_per_comp > 1))}


# -- safety ------------------------------------------------------------------------------------
def bench_safety(paths: list[Path], images: int, repeats: int) -> dict:
    import torch

    import safety

    blobs = all_blobs(paths)[:images]
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    return {
        "nsfw": safety.bench_nsfw(blobs, 128 if torch.cuda.is_available() else 8, repeats, sync),
        "face_blur": safety.bench_face_blur(blobs, repeats, sync),
    }


# -- driver ------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["prepare", "embed", "knn", "safety", "all"])
    ap.add_argument("--data", type=Path, default=ROOT / ".gpu_data")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--imagenet", type=int, default=200, help="prepare: ImageNet seed photos (~110 KB each)")
    ap.add_argument("--caltech", type=int, default=600, help="prepare: Caltech-101 photos (~16 KB each)")
    ap.add_argument("--models", nargs="*", default=list(EMBED_MODELS), choices=list(EMBED_MODELS))
    ap.add_argument("--embed-images", type=int, default=8192)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--threads", type=int, default=0, help="CPU decode threads (0: every core)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--knn-sizes", type=int, nargs="*", default=[1_000_000, 10_000_000])
    ap.add_argument("--knn-budget", type=float, default=120.0, help="seconds a method may take to build one whole graph")
    ap.add_argument("--knn-probe", type=int, default=32_768, help="queries timed to estimate a whole graph")
    ap.add_argument("--knn-recall-queries", type=int, default=1000)
    ap.add_argument("--safety-images", type=int, default=256)
    ap.add_argument("--tiny", action="store_true", help="CPU self-test sizes (gpu_pipeline.sh selftest)")
    args = ap.parse_args()
    if args.part == "prepare":
        return prepare(args.data, args.imagenet, args.caltech)
    if args.tiny:
        args.models, args.embed_images, args.batch_size, args.rounds = ["ViT-S/14"], 32, 8, 1
        args.knn_sizes, args.knn_probe, args.knn_recall_queries, args.safety_images = [3000], 512, 100, 4
    import tempfile

    import torch

    paths = shard_paths(args.data)
    threads = args.threads or os.cpu_count() or 1
    commit_file = args.data / "commit.txt"
    report: dict = {"benchmark": "gpu_pipeline", "commit": commit_file.read_text().strip() if commit_file.exists() else None,
                    "cuda": torch.cuda.is_available(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
                    "torch": torch.__version__, "cpus": os.cpu_count(), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}}
    t0 = time.perf_counter()
    parts = ["embed", "knn", "safety"] if args.part == "all" else [args.part]
    with tempfile.TemporaryDirectory(prefix="gpu_pipeline-") as tmp:
        for part in parts:
            t = time.perf_counter()
            try:
                if part == "embed":
                    report["embed"] = [bench_embed(paths, m, EMBED_MODELS[m], args.embed_images, args.batch_size, threads, args.rounds, Path(tmp)) for m in args.models]
                elif part == "knn":
                    report["knn"] = [bench_knn(n, 256, 64, 0.6, args.knn_budget, args.knn_probe, args.knn_recall_queries, threads) for n in args.knn_sizes]
                else:
                    report["safety"] = bench_safety(paths, args.safety_images, 2)
            except Exception as e:  # keep what the other parts measured
                report[part] = {"error": f"{type(e).__name__}: {e}"}
            report.setdefault("part_seconds", {})[part] = round(time.perf_counter() - t, 1)
            print(json.dumps({part: report[part]}, indent=1, default=str)[:4000], flush=True)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    write_result("gpu_pipeline", report, args.out, quick=args.tiny)


if __name__ == "__main__":
    main()
