"""Every map stage against its bare library call, and against the commit before, in one run.

Real photos (../shared/data: pool_caltech101, seeds_imagenet and faces, interleaved; never
copied into the repository) are written to Parquet shards in a temporary folder. Then, for this
checkout and for a checkout of an older commit (``--baseline``, extracted with ``git archive``
into the same temporary folder), a worker process per tree and round:

* runs each stage's own ``setup`` + ``process`` over the shards (reading them included), with
  the tree's default options for that stage;
* runs the bare library call on the same rows in the same process (shards read the same way):
  decode: Pillow ``open`` + ``load`` + ``convert("RGB")``; phash: Pillow + ``imagehash.phash`` of
  the image and of its mirror; pixels: Pillow + grey 32x32 BOX thumbnail + centring in numpy;
  timm: Pillow + timm's eval transform + the model's forward pass (ViT-T/16, random init);
  nsfw: Pillow + ``opennsfw2.preprocess_image`` + the model (weights saved from its own
  architecture, as the tests do); face_blur: Pillow + facenet-pytorch ``MTCNN.detect`` at full
  resolution, ``min_face_size=20``, one image at a time.

Rounds alternate the order of the trees, so that drift in a shared machine's load falls on both;
each figure is the median over rounds of process-CPU seconds (torch on one thread, decode
threads counted), with wall seconds alongside. Then the whole weight-free pipeline of the older
commit (its ``pipelines/demo.yaml``, run by both trees so the stages are the same, with
``--allow-missing-weights`` on ``--run-images`` photos: Caltech-101 as the pool, ImageNet as
seeds) runs for each tree, alternating, and its images/s is input images over the command's wall
time (Ray start-up included, as a user sees it); ours' own demo.yaml runs once besides.

    .venv/bin/python benchmarks/stages.py --quick                 # a smoke run, a few minutes
    .venv/bin/python benchmarks/stages.py                         # the committed figures
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
ROOT = HERE.parents[1]
DATA = ROOT.parent / "shared" / "data"
BASELINE = "9d46f37"
SHARD_ROWS = 250

# stage -> (photos it runs on by default, quick), the costly model stages on a prefix.
STAGE_IMAGES = {"decode": None, "phash": None, "pixels": None, "timm": 256, "nsfw": 48, "face_blur": 400}
QUICK_IMAGES = {"decode": 120, "phash": 120, "pixels": 120, "timm": 32, "nsfw": 8, "face_blur": 24}


# -- data ------------------------------------------------------------------------------------
def pick_photos(limit: int) -> list[Path]:
    """Faces first (so face_blur blurs some), then Caltech-101 and ImageNet interleaved."""
    faces = sorted((DATA / "faces").rglob("*.jpg"))
    pools = [sorted((DATA / "pool_caltech101").rglob("*.jpg")), sorted((DATA / "seeds_imagenet").glob("*.JPEG"))]
    picked = list(faces)
    for i in range(max(len(p) for p in pools)):
        for files in pools:
            if i < len(files):
                picked.append(files[i])
    return picked[:limit]


def write_shards(photos: list[Path], folder: Path) -> list[Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in range(0, len(photos), SHARD_ROWS):
        chunk = photos[s : s + SHARD_ROWS]
        table = pa.table(
            {
                "uid": pa.array(range(s, s + len(chunk)), pa.int64()),
                "role": ["pool"] * len(chunk),
                "bytes": pa.array([p.read_bytes() for p in chunk], pa.binary()),
            }
        )
        paths.append(folder / f"part-{s // SHARD_ROWS:05d}.parquet")
        pq.write_table(table, paths[-1])
    return paths


def checkout(commit: str, dest: Path) -> Path:
    """The tree of ``commit`` (as ``git worktree add`` would check it out), without registering
    a worktree in the shared repository."""
    dest.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


# -- worker: runs inside one tree ------------------------------------------------------------
def read_rows(shards: list[str], limit: int | None):
    """The shards' rows, ``limit`` of them, as Arrow tables (read inside the timed region)."""
    import pyarrow.parquet as pq

    left = limit
    for path in shards:
        table = pq.read_table(path)
        if left is not None:
            table = table.slice(0, left)
            left -= table.num_rows
        if table.num_rows:
            yield table
        if left is not None and left <= 0:
            return


def batches(table, size: int):
    for s in range(0, table.num_rows, size):
        yield table.slice(s, size)


def write_untrained_nsfw_weights(path: Path) -> None:
    import h5py
    import opennsfw2
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = opennsfw2.make_open_nsfw_model(weights_path=None)
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def make_stage(name: str, tmp: Path):
    """(stage, batch size) with the tree's defaults for that stage."""
    from curation.stage import StageContext

    ctx = StageContext(run_dir=tmp, stage_dir=tmp / name, cluster_cpus=1)
    if name == "decode":
        from curation.stages.decode import DecodeConfig, DecodeStage

        return DecodeStage(DecodeConfig(), ctx), 64
    if name == "phash":
        from curation.stages.phash import PhashConfig, PhashStage

        return PhashStage(PhashConfig(), ctx), 64
    if name in ("pixels", "timm"):
        from curation.stages.embed import STAGE, EmbedConfig

        model = {"type": "pixels", "size": 32, "grayscale": True} if name == "pixels" else {"type": "timm", "name": "vit_tiny_patch16_224", "pretrained": False}
        batch = 256 if name == "pixels" else 64
        cfg = EmbedConfig.model_validate({"kind": "embed", "model": model, "batch_size": batch, "rows_per_call": SHARD_ROWS, "decode_threads": 1, "dtype": "float32"})
        return STAGE(cfg, ctx), SHARD_ROWS
    if name == "nsfw":
        from curation.stages.nsfw import STAGE, Config

        weights = tmp / "open_nsfw_weights.h5"
        if not weights.exists():
            write_untrained_nsfw_weights(weights)
        return STAGE(Config(weights=weights, batch_size=16), ctx), 16
    if name == "face_blur":
        from curation.stages.face_blur import STAGE, Config

        return STAGE(Config(), ctx), 32
    raise SystemExit(f"unknown stage {name}")


def make_bare(name: str, tmp: Path):
    """A function of a list of encoded images doing what the stage's library call does."""
    import numpy as np
    from PIL import Image, ImageOps

    def pil(data: bytes) -> Image.Image:
        return Image.open(io.BytesIO(data)).convert("RGB")

    if name == "decode":
        def decode(blobs):
            for b in blobs:
                img = Image.open(io.BytesIO(b))
                img.load()
                img.convert("RGB")
        return decode
    if name == "phash":
        import imagehash

        def phash(blobs):
            for b in blobs:
                img = pil(b)
                imagehash.phash(img), imagehash.phash(ImageOps.mirror(img))
        return phash
    if name == "pixels":
        def pixels(blobs):
            rows = []
            for b in blobs:
                a = np.asarray(pil(b).convert("L").resize((32, 32), Image.Resampling.BOX), np.float32).reshape(-1) / 255
                rows.append(a - a.mean())
            x = np.stack(rows)
            return x / np.linalg.norm(x, axis=1, keepdims=True).clip(1e-12)
        return pixels
    if name == "timm":
        import timm
        import torch
        from timm.data import create_transform, resolve_model_data_config

        model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
        transform = create_transform(**resolve_model_data_config(model), is_training=False)

        def forward(blobs):
            with torch.inference_mode():
                for s in range(0, len(blobs), 64):
                    model(torch.stack([transform(pil(b)) for b in blobs[s : s + 64]]))
        return forward
    if name == "nsfw":
        import opennsfw2
        import torch

        weights = tmp / "open_nsfw_weights.h5"
        if not weights.exists():
            write_untrained_nsfw_weights(weights)
        model = opennsfw2.make_open_nsfw_model(weights_path=str(weights))

        def nsfw(blobs):
            with torch.no_grad():
                for s in range(0, len(blobs), 16):
                    x = np.stack([opennsfw2.preprocess_image(pil(b), opennsfw2.Preprocessing.YAHOO) for b in blobs[s : s + 16]])
                    model(torch.from_numpy(x), training=False)
        return nsfw
    if name == "face_blur":
        from facenet_pytorch import MTCNN

        mtcnn = MTCNN(keep_all=True, post_process=False, min_face_size=20)

        def detect(blobs):
            for b in blobs:
                mtcnn.detect(pil(b))
        return detect
    raise SystemExit(f"unknown stage {name}")


def timed(fn) -> dict:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return {"wall": time.perf_counter() - w, "cpu": time.process_time() - c}


def worker(args) -> None:
    sys.path.insert(0, str(args.tree))
    os.chdir(args.tree)
    import torch

    torch.set_num_threads(1)
    shards = json.loads(args.shards)
    sizes = json.loads(args.sizes)
    tmp = Path(tempfile.mkdtemp(prefix="stages-worker-"))
    out = {}
    for name in args.stages.split(","):
        stage, batch_size = make_stage(name, tmp)
        stage.setup()
        bare = make_bare(name, tmp)
        limit = sizes[name]
        first = next(read_rows(shards, 8))  # warm-up: lazy imports, allocator, thread pools
        stage.process(first)
        bare(first.column("bytes").to_pylist())

        def run_stage():
            for table in read_rows(shards, limit):
                for b in batches(table, batch_size):
                    stage.process(b)

        def run_bare():
            for table in read_rows(shards, limit):
                bare(table.column("bytes").to_pylist())

        images = sum(t.num_rows for t in read_rows(shards, limit))
        out[name] = {"images": images, "stage": timed(run_stage), "bare": timed(run_bare)}
        print(f"  [{args.label}] {name}: {images} images, stage {out[name]['stage']['cpu']:.2f} cpu-s, bare {out[name]['bare']['cpu']:.2f} cpu-s", file=sys.stderr, flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out))


def tree_env(tree: Path) -> dict:
    return {
        **os.environ,
        "PYTHONPATH": str(tree),
        "HF_HUB_OFFLINE": "1",
        "KERAS_BACKEND": "torch",
        "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
        "OMP_NUM_THREADS": "1",
        "PYTHONWARNINGS": "ignore",
    }


def run_worker(tree: Path, label: str, shards: list[Path], stages: list[str], sizes: dict) -> dict:
    cmd = [sys.executable, str(HERE), "--worker", "--tree", str(tree), "--label", label, "--stages", ",".join(stages),
           "--shards", json.dumps([str(p) for p in shards]), "--sizes", json.dumps(sizes)]
    proc = subprocess.run(cmd, env=tree_env(tree), stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- the whole weight-free run -----------------------------------------------------------------
def run_inputs(work: Path, images: int) -> tuple[Path, Path]:
    """Caltech-101 as the pool and ImageNet as the seeds, ``images`` photos in all."""
    seeds = sorted((DATA / "seeds_imagenet").glob("*.JPEG"))[: images // 3]
    pool = sorted((DATA / "pool_caltech101").rglob("*.jpg"))[: images - len(seeds)]
    for files, folder, base in ((pool, work / "pool", DATA / "pool_caltech101"), (seeds, work / "seeds", DATA / "seeds_imagenet")):
        for f in files:
            dst = folder / f.relative_to(base)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
    return work / "pool", work / "seeds"


def whole_run(tree: Path, pool: Path, seeds: Path, out: Path, config: str = "demo") -> dict:
    cmd = [sys.executable, "-m", "curation.cli", "run", "--pool", str(pool), "--seeds", str(seeds), "--config", config,
           "--out", str(out), "--allow-missing-weights"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=tree, env=tree_env(tree), capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"curate run failed in {tree}:\n{proc.stderr[-3000:]}")
    manifest = json.loads((out / "manifest.json").read_text())
    counts = manifest["counts"]
    stages = {s["stage"]: round(float(s.get("wall_seconds") or 0.0), 2) for s in manifest.get("stages", []) if isinstance(s, dict) and "stage" in s}
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "input": counts["input"], "kept": counts["kept"], "stage_wall_seconds": stages}


# -- driver ----------------------------------------------------------------------------------
def median_of(rounds: list[dict], *keys) -> float:
    values = []
    for r in rounds:
        v = r
        for k in keys:
            v = v[k]
        values.append(v)
    return statistics.median(values)


def summarise(per_tree: dict[str, list[dict]], stages: list[str]) -> dict:
    table = {}
    for name in stages:
        row = {}
        for label, rounds in per_tree.items():
            n = rounds[0][name]["images"]
            for which in ("stage", "bare"):
                for clock in ("cpu", "wall"):
                    row[f"{label}_{which}_images_per_{clock}_s"] = round(n / median_of(rounds, name, which, clock), 2)
            row[f"{label}_stage_over_bare_cpu"] = round(median_of(rounds, name, "bare", "cpu") / median_of(rounds, name, "stage", "cpu"), 3)
            row[f"{label}_stage_over_bare_wall"] = round(median_of(rounds, name, "bare", "wall") / median_of(rounds, name, "stage", "wall"), 3)
            row["images"] = n
        if "baseline" in per_tree:
            row["ours_over_baseline_cpu"] = round(row["ours_stage_images_per_cpu_s"] / row["baseline_stage_images_per_cpu_s"], 3)
            row["ours_over_baseline_wall"] = round(row["ours_stage_images_per_wall_s"] / row["baseline_stage_images_per_wall_s"], 3)
        table[name] = row
    return table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000, help="photos for the fast stages (the model stages use a prefix)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline", default=BASELINE, help="older commit measured in the same run ('' to skip)")
    ap.add_argument("--stages", default=",".join(STAGE_IMAGES))
    ap.add_argument("--run-images", type=int, default=3000, help="photos for the whole `curate run` (0: skip)")
    ap.add_argument("--run-rounds", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes, one round: checks that everything runs")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--label", default="", help=argparse.SUPPRESS)
    ap.add_argument("--shards", help=argparse.SUPPRESS)
    ap.add_argument("--sizes", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    sys.path.insert(0, str(HERE.parent))
    from common import git_commit, write_result

    if not DATA.is_dir():
        raise SystemExit(f"real-image data not found at {DATA}")
    stages = args.stages.split(",")
    if args.quick:
        args.images, args.rounds, args.run_images, args.run_rounds = 120, 1, min(args.run_images, 300), 1
    sizes = {s: min(args.images, (QUICK_IMAGES if args.quick else STAGE_IMAGES)[s] or args.images) for s in stages}
    work = Path(tempfile.mkdtemp(prefix="bench-stages-"))
    load_before = os.getloadavg()
    try:
        shards = write_shards(pick_photos(args.images), work / "shards")
        trees = {"ours": ROOT}
        if args.baseline:
            trees["baseline"] = checkout(args.baseline, work / "baseline")
        per_tree: dict[str, list[dict]] = {label: [] for label in trees}
        for r in range(args.rounds):
            order = list(trees) if r % 2 == 0 else list(reversed(trees))
            for label in order:
                print(f"round {r + 1}/{args.rounds}: {label}", file=sys.stderr, flush=True)
                per_tree[label].append(run_worker(trees[label], label, shards, stages, sizes))
        runs: dict[str, list[dict]] = {label: [] for label in trees}
        if args.run_images:
            pool, seeds = run_inputs(work / "run_inputs", args.run_images)
            # The same stages in both trees: the older commit's weight-free demo pipeline (each
            # tree's own demo.yaml may hold other stages); ours' current demo.yaml once besides.
            config = str(trees["baseline"] / "pipelines" / "demo.yaml") if "baseline" in trees else "demo"
            for r in range(args.run_rounds):
                for label in (list(trees) if r % 2 == 0 else list(reversed(trees))):
                    print(f"curate run {r + 1}/{args.run_rounds}: {label}", file=sys.stderr, flush=True)
                    runs[label].append(whole_run(trees[label], pool, seeds, work / f"run-{label}-{r}", config))
            if "baseline" in trees:
                print("curate run: ours, its own demo.yaml", file=sys.stderr, flush=True)
                runs["ours_own_demo"] = [whole_run(ROOT, pool, seeds, work / "run-ours-own")]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    table = summarise(per_tree, stages)
    whole = {}
    for label, rs in runs.items():
        if rs:
            seconds = statistics.median(r["seconds"] for r in rs)
            whole[label] = {"images": rs[0]["input"], "kept": rs[0]["kept"], "seconds": [round(r["seconds"], 2) for r in rs],
                            "images_per_s": round(rs[0]["input"] / seconds, 2), "stage_wall_seconds": rs[-1]["stage_wall_seconds"]}
    if "ours" in whole and "baseline" in whole:
        whole["ours_over_baseline"] = round(whole["ours"]["images_per_s"] / whole["baseline"]["images_per_s"], 3)

    print(f"\nmap stages, images per process-CPU second (median of {args.rounds} interleaved rounds; torch on 1 thread)")
    head = f"{'stage':<10} {'images':>6} | {'ours':>8} {'bare':>8} {'ratio':>6}"
    if "baseline" in trees:
        head += f" | {'before':>8} {'ratio':>6} | {'ours/before':>11}"
    print(head)
    for name, row in table.items():
        line = f"{name:<10} {row['images']:>6} | {row['ours_stage_images_per_cpu_s']:>8.1f} {row['ours_bare_images_per_cpu_s']:>8.1f} {row['ours_stage_over_bare_cpu']:>6.2f}"
        if "baseline" in trees:
            line += f" | {row['baseline_stage_images_per_cpu_s']:>8.1f} {row['baseline_stage_over_bare_cpu']:>6.2f} | {row['ours_over_baseline_cpu']:>11.2f}"
        print(line)
    for label in ("ours", "baseline", "ours_own_demo"):
        if label in whole:
            w = whole[label]
            print(f"curate run ({label}): {w['images']} photos, {w['images_per_s']:.1f} images/s, runs {w['seconds']} s; stages {w['stage_wall_seconds']}")
    if "ours_over_baseline" in whole:
        print(f"whole run, ours over before: {whole['ours_over_baseline']:.2f}x")

    report = {
        "benchmark": "stages",
        "baseline_commit": args.baseline or None,
        "ours_commit": git_commit(),
        "cpus": os.cpu_count(),
        "load_average_before_after": [round(v, 2) for v in (*load_before, *os.getloadavg())],
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "tree", "label", "shards", "sizes")},
        "images_per_stage": sizes,
        "map_stages": table,
        "rounds": per_tree,
        "whole_run": whole,
        "notes": "stage: the stage's process() over Parquet shards (reads included); bare: the library call on the same rows; "
        "ratios are images per CPU-second, ours/bare and ours/before; whole_run: `curate run --config <the older commit's "
        "pipelines/demo.yaml> --allow-missing-weights` in both trees (the same stages), wall time including Ray start-up; "
        "ours_own_demo: ours with its current demo.yaml (it adds the local-feature copy detection), once",
    }
    write_result("stages", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
