"""Throughput of the safety stages against their bare model calls.

Real photos (../shared/data: pool_caltech101 and the faces folder, read into memory first) go
through each whole stage (``process``: decode, preprocess, model, blur/re-encode, Arrow output)
and, in the same run on the same images, through the bare model call alone:

* **nsfw**: the stage versus ``model(x)`` on the already-preprocessed batch (the stage overhead
  is decoding plus opennsfw2's YAHOO preprocessing, which JPEG-round-trips every image), and
  versus opennsfw2's own ``predict_images`` API on decoded images.
* **face_blur**: the stage versus facenet-pytorch's own ``MTCNN.detect`` at the stage's
  settings (full resolution, ``min_face_size=20``) on the already-decoded images, grouped by
  size as the stage groups them, and versus the naive use of MTCNN: Pillow decode + one
  ``detect`` per image. The stage also decodes, blurs, re-encodes and checks its output again.
* **face_blur settings**: cheaper detection settings (a detection copy capped at
  ``detect_max_side``, a larger ``min_face_size``) against the default, by recall of the faces
  the default finds on the face photos of ../shared/data and on the benchmark's photos, and by
  speed of the detector alone.

Weights: the NSFW model is written untrained in the published file format (the real file cannot
be downloaded here; throughput does not depend on weight values). MTCNN weights ship with
facenet-pytorch.

Rates are given per wall second and per process-CPU second; on a shared CPU the CPU-second
ratios are the stable ones (run with --threads 1, as a Ray worker with num_cpus=1 does).

    .venv/bin/python benchmarks/safety.py --quick --threads 1    # a minute or two on 2 CPU cores
    .venv/bin/python benchmarks/safety.py --threads 1 --images 48  # the committed CPU figures
    .venv/bin/python benchmarks/safety.py                          # on the GPU when present
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from common import device_name, git_commit  # noqa: E402  (benchmarks/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "torch")






def read_photos(limit: int) -> list[bytes]:
    """Faces first (so every run blurs some), then Caltech-101 spread over its classes."""
    faces = sorted((DATA / "faces").rglob("*.jpg")) + sorted((DATA / "faces").rglob("*.png"))
    caltech = sorted((DATA / "pool_caltech101").rglob("*.jpg"))
    if not caltech:
        raise SystemExit(f"no images under {DATA}")
    spread = caltech[:: max(1, len(caltech) // limit)]
    return [p.read_bytes() for p in (faces + spread)[:limit]]


def timed(fns: dict, repeats: int, sync) -> dict[str, dict[str, float]]:
    """Best wall and process-CPU seconds of each function over ``repeats`` interleaved rounds,
    after one warm-up call each.

    Interleaving and taking the best round keep other processes on a shared machine from
    favouring one side of a ratio; CPU seconds (torch on one thread) count only our own work.
    """
    for fn in fns.values():
        fn()
        sync()
    best = {name: {"wall": float("inf"), "cpu": float("inf")} for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync()
            best[name]["wall"] = min(best[name]["wall"], time.perf_counter() - w)
            best[name]["cpu"] = min(best[name]["cpu"], time.process_time() - c)
    return best


def rates(n: int, times: dict, stage: str, baselines: dict[str, str]) -> dict:
    """Images/s per function and stage-over-baseline ratios, by wall and by CPU time."""
    out = {}
    for name, t in times.items():
        out[f"{name}_images_per_s"] = n / t["wall"]
        out[f"{name}_images_per_cpu_s"] = n / t["cpu"]
    for name, label in baselines.items():
        out[f"stage_over_{label}"] = times[name]["wall"] / times[stage]["wall"]
        out[f"stage_over_{label}_cpu"] = times[name]["cpu"] / times[stage]["cpu"]
    return out


def write_untrained_nsfw_weights(path: Path) -> None:
    import h5py
    import opennsfw2
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = opennsfw2.make_open_nsfw_model(weights_path=None)
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)


def bench_nsfw(blobs: list[bytes], batch_size: int, repeats: int, sync) -> dict:
    import opennsfw2
    import pyarrow as pa
    import torch

    from curation.imaging import decode_rgb
    from curation.stage import StageContext
    from curation.stages.nsfw import STAGE, Config

    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "open_nsfw_weights.h5"
        write_untrained_nsfw_weights(weights)
        stage = STAGE(Config(weights=weights, batch_size=batch_size), StageContext(run_dir=Path(tmp), stage_dir=Path(tmp)))
        stage.setup()
        backend = stage._backend
        table = pa.table({"role": ["pool"] * len(blobs), "bytes": pa.array(blobs, pa.binary())})
        images = [decode_rgb(b) for b in blobs]
        x = torch.from_numpy(np.stack([backend.preprocess(im) for im in images])).to(backend.device)

        def bare():
            with torch.no_grad():
                for i in range(0, len(x), batch_size):
                    backend.model(x[i : i + batch_size], training=False)

        def library():
            # predict_images fails on the torch backend outside no_grad (numpy() of a tensor
            # that requires grad), one reason the stage calls the model itself.
            with torch.no_grad():
                opennsfw2.predict_images(images, batch_size=batch_size, weights_path=str(weights))

        times = timed({"stage": lambda: stage.process(table), "bare_model": bare, "opennsfw2_api": library}, repeats, sync)
    return {
        "images": len(blobs),
        "batch_size": batch_size,
        "device": backend.device,
        **rates(len(blobs), times, "stage", {"bare_model": "bare_model", "opennsfw2_api": "opennsfw2_api"}),
    }


def bench_face_blur(blobs: list[bytes], repeats: int, sync) -> dict:
    import io

    import pyarrow as pa
    from facenet_pytorch import MTCNN
    from PIL import Image

    from curation.imaging import decode_rgb
    from curation.stage import StageContext
    from curation.stages.face_blur import FACES, STAGE, Config

    config = Config()
    stage = STAGE(config, StageContext(run_dir=Path("/tmp"), stage_dir=Path("/tmp")))
    stage.setup()
    stock = MTCNN(keep_all=True, select_largest=False, post_process=False, min_face_size=config.min_face_size, device=stage._detector.mtcnn.device)
    table = pa.table({"role": ["pool"] * len(blobs), "bytes": pa.array(blobs, pa.binary())})
    images = [decode_rgb(b) for b in blobs]
    groups: dict[tuple, list] = {}
    for im in images:
        groups.setdefault(im.size, []).append(im)

    def bare():
        for group in groups.values():
            stock.detect(group)

    def naive():
        for b in blobs:
            stock.detect(Image.open(io.BytesIO(b)).convert("RGB"))

    out = stage.process(table)
    times = timed({"stage": lambda: stage.process(table), "bare_detect": bare, "full_res_detect": naive}, repeats, sync)
    return {
        "images": len(blobs),
        "images_with_faces": int(sum(1 for f in out.column(FACES).to_pylist() if f)),
        "detect_max_side": config.detect_max_side,
        "device": str(stock.device),
        **rates(len(blobs), times, "stage", {"bare_detect": "bare_detect", "full_res_detect": "full_res_detect"}),
    }


def _matched(found, truth, iou: float = 0.3) -> int:
    """Faces of ``truth`` that some box of ``found`` overlaps at >= ``iou``."""
    hits = 0
    for t in truth.boxes:
        for f in found.boxes:
            ix = max(0.0, min(t[2], f[2]) - max(t[0], f[0]))
            iy = max(0.0, min(t[3], f[3]) - max(t[1], f[1]))
            inter = ix * iy
            union = (t[2] - t[0]) * (t[3] - t[1]) + (f[2] - f[0]) * (f[3] - f[1]) - inter
            if union > 0 and inter / union >= iou:
                hits += 1
                break
    return hits


def bench_face_settings(face_blobs: list[bytes], seed_photos: int) -> list[dict]:
    """Recall and speed of cheaper detection settings, against the default's faces, on the face
    photos and on ImageNet seed photos (many with people in them)."""
    from curation.imaging import decode_rgb
    from curation.safety.faces import FaceDetector

    seeds = sorted((DATA / "seeds_imagenet").glob("*.JPEG"))
    seeds = seeds[:: max(1, len(seeds) // seed_photos)][:seed_photos]
    sets = {"face_photos": [decode_rgb(b) for b in face_blobs], "imagenet_photos": [decode_rgb(p.read_bytes()) for p in seeds]}
    default = FaceDetector()
    truth = {name: default.detect(imgs) for name, imgs in sets.items()}
    rows = []
    for max_side, min_face in ((None, 20), (1024, 20), (640, 20), (None, 32)):
        detector = FaceDetector(min_face_size=min_face, detect_max_side=max_side)
        row = {"detect_max_side": max_side, "min_face_size": min_face}
        for name, imgs in sets.items():
            t = time.process_time()
            found = detector.detect(imgs)
            seconds = time.process_time() - t
            total = sum(len(f) for f in truth[name])
            hit = sum(_matched(f, g) for f, g in zip(found, truth[name]))
            row[name] = {"faces_of_default": total, "recall": round(hit / total, 4) if total else None, "images_per_cpu_s": round(len(imgs) / seconds, 2)}
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="few images, few repeats")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--settings-photos", type=int, default=400, help="ImageNet photos for the detection-settings recall")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["nsfw", "face_blur", "face_settings"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    images = args.images or (32 if args.quick else (512 if gpu else 128))
    batch_size = args.batch_size or (16 if args.quick else (128 if gpu else 32))
    repeats = args.repeats or (2 if args.quick else 3)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    blobs = read_photos(images)

    result = {
        "benchmark": "safety",
        "device": device_name(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": git_commit(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "megapixels_mean": None,
    }
    from curation.imaging import probe

    result["megapixels_mean"] = float(np.mean([probe(b).width * probe(b).height for b in blobs]) / 1e6)
    if "nsfw" not in args.skip:
        result["nsfw"] = bench_nsfw(blobs, batch_size, repeats, sync)
    if "face_blur" not in args.skip:
        result["face_blur"] = bench_face_blur(blobs, repeats, sync)
    if "face_settings" not in args.skip:
        result["face_settings"] = bench_face_settings(read_photos(10), 24 if args.quick else args.settings_photos)

    print(f"safety benchmark on {result['device']} ({len(blobs)} photos, {result['megapixels_mean']:.2f} MP mean, torch threads {result['torch_threads']})")
    rows = []
    if "nsfw" in result:
        r = result["nsfw"]
        rows.append(("nsfw", r, "bare_model", "opennsfw2_api", "opennsfw2 predict_images"))
    if "face_blur" in result:
        r = result["face_blur"]
        rows.append(("face_blur", r, "bare_detect", "full_res_detect", "Pillow + MTCNN per image"))
    print(f"{'stage':<10} {'img/s':>7} {'img/cpu-s':>9} | {'bare model img/s':>16} {'stage/bare':>10} {'(cpu)':>6} | other baseline")
    for name, r, bare, other, label in rows:
        print(
            f"{name:<10} {r['stage_images_per_s']:>7.1f} {r['stage_images_per_cpu_s']:>9.1f} | "
            f"{r[bare + '_images_per_s']:>16.1f} {r['stage_over_' + bare]:>10.2f} {r['stage_over_' + bare + '_cpu']:>6.2f} | "
            f"{label}: {r[other + '_images_per_s']:.1f} img/s, stage x{r['stage_over_' + other]:.2f} (cpu x{r['stage_over_' + other + '_cpu']:.2f})"
        )
    for row in result.get("face_settings", []):
        cells = "; ".join(f"{k}: recall {v['recall']}, {v['images_per_cpu_s']} img/cpu-s" for k, v in row.items() if isinstance(v, dict))
        print(f"face detection detect_max_side={row['detect_max_side']} min_face_size={row['min_face_size']}: {cells}")
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"safety-{result['device']}{'-quick' if args.quick else ''}.json"
    (args.out / name).write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
