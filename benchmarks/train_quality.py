"""Does pretraining help? k-NN and linear accuracy of a pretrained ViT vs the same ViT at random init.

Pretrains on the real photos of ../shared/data (ImageNet seeds, clothing, and the training split
of Caltech-101; the Caltech test split is held out) through a manifest like the pipeline's, for
a wall-time budget, then evaluates frozen features on the deterministic 80/20 split of
pool_caltech101 (100 classes).

    python benchmarks/train_quality.py            # ViT-S/16, 224/96 crops, ~10 min (GPU)
    python benchmarks/train_quality.py --quick    # tiny ViT, 64/32 crops, a few minutes (CPU)
    python benchmarks/train_quality.py --quick --minutes 40   # the CPU run kept in results/

With --quick the manifest stores each photo downscaled (shorter side 2x the global crop): on a
CPU, decoding full-size JPEGs costs more than a step of the tiny ViT, and the crops are 64 px.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_name, git_commit, write_result  # noqa: E402

from curation.train.config import TrainConfig  # noqa: E402
from curation.train.data import LabelledImages, list_labelled_images, split_labelled  # noqa: E402
from curation.train.evaluate import from_training_vit, extract, knn_accuracy, linear_probe, random_backbone  # noqa: E402
from curation.train.trainer import Trainer  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def shrunk(path: Path, short_side: int) -> bytes:
    """The image re-encoded with its shorter side at most ``short_side`` (JPEG, quality 90)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = short_side / min(im.size)
        if scale < 1:
            im = im.resize((max(1, round(im.width * scale)), max(1, round(im.height * scale))), Image.BICUBIC)
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        return buf.getvalue()


def write_manifest(paths: list[Path], out: Path, rows_per_shard: int = 256, short_side: int | None = None) -> Path:
    """A ``curation.manifest/1`` over the given image files (bytes as they are, or downscaled)."""
    (out / "dataset").mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(paths), rows_per_shard)):
        chunk = [p.read_bytes() if short_side is None else shrunk(p, short_side) for p in paths[start : start + rows_per_shard]]
        n = len(chunk)
        table = pa.table({
            "id": [hashlib.sha256(b).hexdigest() for b in chunk], "bytes": pa.array(chunk, pa.binary()),
            "width": pa.array([0] * n, pa.int32()), "height": pa.array([0] * n, pa.int32()),
            "source": ["shared_data"] * n, "source_key": [str(p) for p in paths[start : start + n]],
            "role": ["pool"] * n, "seed_dataset": pa.array([None] * n, pa.string()), "label": pa.array([None] * n, pa.string()),
        })
        rel = f"dataset/part-{s:05d}.parquet"
        pq.write_table(table, out / rel, row_group_size=64)
        shards.append({"path": rel, "rows": n, "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest()})
    path = out / "manifest.json"
    path.write_text(json.dumps({"format": "curation.manifest/1", "shards": shards, "counts": {"kept": len(paths)}, "config": {}, "seeds": {}}))
    return path


def pretraining_images(caltech_test: set[Path]) -> list[Path]:
    paths = []
    for folder in ("seeds_imagenet", "clothing_cc0", "pool_caltech101"):
        paths += [p for p, _ in list_labelled_images(DATA / folder)] if folder != "seeds_imagenet" else sorted((DATA / folder).glob("*.JPEG"))
    return [p for p in paths if p not in caltech_test]


def config(quick: bool, iters: int, device: torch.device) -> TrainConfig:
    epochs = 10
    ipe = max(iters // epochs, 1)
    if quick:
        model = {"arch": "custom", "embed_dim": 96, "depth": 4, "num_heads": 3, "patch_size": 8, "drop_path_rate": 0.0}
        head = {"out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128}
        crops = {"global_size": 64, "local_size": 32, "n_local": 4}
        batch, workers = 32, 1
    else:
        model = {"arch": "vit_small", "patch_size": 16, "drop_path_rate": 0.1}
        head = {"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256}
        crops = {"global_size": 224, "local_size": 96, "n_local": 8}
        batch, workers = 128, 12
    return TrainConfig.model_validate({
        "model": model, "head": head, "crops": crops,
        "optim": {"epochs": epochs, "iters_per_epoch": ipe, "batch_size": batch, "warmup_epochs": 1, "base_lr": 0.004,
                  "freeze_last_layer_epochs": 1},
        "loss": {"warmup_teacher_temp_epochs": 3},
        "data": {"num_workers": workers, "shuffle_buffer": 512},
        "log_every": 10, "checkpoint_every": 10**9,
    })


def seconds_per_step(cfg: TrainConfig, manifest: Path, tmp: Path) -> float:
    """Steady-state step time, from which the schedule length follows: the difference of two short
    runs, so that start-up (loader workers, filling the shuffle buffer) is not counted."""
    took = {}
    for n in (2, 10):
        t0 = time.perf_counter()
        Trainer(cfg.model_copy(update={"max_iters": n}), manifest, tmp / f"probe{n}").fit(resume=False)
        took[n] = time.perf_counter() - t0
    return max((took[10] - took[2]) / 8, 1e-3)


def losses(record: dict) -> dict:
    return {k: record[k] for k in ("iteration", "loss", "dino", "ibot", "koleo") if k in record}


def evaluate(backbone, train, test, classes, size, linear_epochs) -> dict:
    dtr, dte = LabelledImages(train, classes, size), LabelledImages(test, classes, size)
    # one pass per split: [class token, mean patch token]; k-NN uses the normalised class token
    ftr, ytr = extract(backbone, dtr, 64, 2, with_patches=True)
    fte, yte = extract(backbone, dte, 64, 2, with_patches=True)
    dim = ftr.shape[1] // 2
    knn = knn_accuracy(F.normalize(ftr[:, :dim], dim=1), ytr, F.normalize(fte[:, :dim], dim=1), yte, len(classes))
    # A random ViT's class token is nearly the same for every image (LayerScale starts at 1e-5),
    # so k-NN on the mean patch token is the fairer random-init baseline; both are reported.
    knn_patch = knn_accuracy(F.normalize(ftr[:, dim:], dim=1), ytr, F.normalize(fte[:, dim:], dim=1), yte, len(classes))
    return {"knn_top1": knn["top1"], "knn_top5": knn["top5"], "knn_patch_mean_top1": knn_patch["top1"],
            "linear_top1": linear_probe(ftr, ytr, fte, yte, len(classes), epochs=linear_epochs)["top1"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--minutes", type=float, default=None, help="pretraining wall-time budget")
    args = p.parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: the real-image data is needed")
    minutes = args.minutes or (3.0 if args.quick else 10.0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    items = list_labelled_images(DATA / "pool_caltech101")
    train, test = split_labelled(items, 0.2)
    classes = sorted({label for _, label in items})
    images = pretraining_images({p for p, _ in test})
    print(f"pretraining on {len(images)} images; evaluation: {len(train)} train / {len(test)} test, {len(classes)} classes")

    with tempfile.TemporaryDirectory() as tmp:
        probe_cfg = config(args.quick, 10**6, device)
        short_side = 2 * probe_cfg.crops.global_size if args.quick else None
        manifest = write_manifest(images, Path(tmp) / "out", short_side=short_side)
        step_s = seconds_per_step(probe_cfg, manifest, Path(tmp))
        iters = max(int(minutes * 60 / step_s), 10)
        cfg = config(args.quick, iters, device).model_copy(update={"max_minutes": minutes})
        print(f"~{step_s:.2f} s/step -> schedule of {cfg.optim.epochs * cfg.optim.iters_per_epoch} iterations")
        trainer = Trainer(cfg, manifest, Path(tmp) / "run")
        t0 = time.perf_counter()
        summary = trainer.fit(resume=False)
        train_minutes = (time.perf_counter() - t0) / 60
        log = [json.loads(line) for line in (Path(tmp) / "run" / "train_log.jsonl").read_text().splitlines()]

    size = cfg.crops.global_size
    linear_epochs = 100 if args.quick else 300
    trained = evaluate(from_training_vit(trainer.teacher.backbone, device), train, test, classes, size, linear_epochs)
    random = evaluate(random_backbone(cfg.model, size, seed=cfg.seed, device=device), train, test, classes, size, linear_epochs)
    print("\n| backbone | k-NN top-1 (class token) | k-NN top-5 | k-NN top-1 (mean patch) | linear top-1 |\n|---|---|---|---|---|")
    for name, r in (("pretrained", trained), ("random init", random)):
        print(f"| {name} | {r['knn_top1']:.3f} | {r['knn_top5']:.3f} | {r['knn_patch_mean_top1']:.3f} | {r['linear_top1']:.3f} |")
    print(f"chance: {1 / len(classes):.3f}; ratios pretrained/random: k-NN {trained['knn_top1'] / max(random['knn_top1'], 1e-9):.2f}, "
          f"k-NN mean patch {trained['knn_patch_mean_top1'] / max(random['knn_patch_mean_top1'], 1e-9):.2f}, "
          f"linear {trained['linear_top1'] / max(random['linear_top1'], 1e-9):.2f}")
    result = {
        "benchmark": "train_quality", "device": device_name(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "commit": git_commit(), "quick": args.quick, "train_minutes": train_minutes, "iterations": summary["iteration"],
        "schedule_iterations": cfg.optim.epochs * cfg.optim.iters_per_epoch, "pretraining_images": len(images),
        "eval": {"dataset": "pool_caltech101", "train": len(train), "test": len(test), "classes": len(classes), "size": size},
        "config": cfg.model_dump(mode="json"), "pretrained": trained, "random_init": random, "chance": 1 / len(classes),
        "losses_first": losses(log[0]) if log else None, "losses_last": losses(log[-1]) if log else None,
        "dino_uniform_loss": math.log(cfg.head.out_dim),  # a student that predicts nothing scores this
    }
    write_result("train_quality", result, quick=args.quick)


if __name__ == "__main__":
    main()
