"""What decoding at the size a stage needs does to its results, and what the stricter decode costs.

1. **Agreement** on every JPEG of ../shared/data: each value the stages compute from a scaled
   (and, for grey descriptors, luma-only) decode against the same value from a full decode:
   perceptual hashes and their mirrors (Hamming distance; phash_dedup's radius is 6), the
   pixel descriptor (cosine), and a timm model's input tensor (cosine), with how often each
   differs at all; plus decode speed both ways.
2. **Dedup results** on the project's quality benchmark (``dedup_quality.py``'s labelled set of
   real photos and transformed copies): the headline methods evaluated on features from a full
   decode and on features from the stages' own ``process`` (phash, dhash, whash with mirrors;
   the embed stage with the pixel descriptor).
3. **Cut-short JPEGs**: how many copies cut at 50/80/95% and closed with an end marker are
   detected (baseline and progressive files apart), how many bottom rows a missed baseline cut
   damages at most, how many intact files needed the confirming second decode, and the check's
   time per image against the decode's.

    .venv/bin/python benchmarks/decode_quality.py --quick
    .venv/bin/python benchmarks/decode_quality.py        # the committed figures
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DATA, ROOT, write_result  # noqa: E402

import dedup_quality as dq  # noqa: E402
from curation import imaging  # noqa: E402
from curation.imaging import DecodeError, decode_rgb, decode_with_info  # noqa: E402
from curation.stage import StageContext  # noqa: E402
from curation.stages.embed import STAGE as EmbedStage, EmbedConfig  # noqa: E402
from curation.stages.phash import PhashConfig, PhashStage, decode_for_hash, image_hash, image_hashes  # noqa: E402
from embedders import build_embedder  # noqa: E402

RADIUS = 6
PIXELS = {"type": "pixels", "size": 32, "grayscale": True}


def real_jpegs(limit: int | None) -> list[bytes]:
    out = []
    for p in sorted(DATA.rglob("*")):
        if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file():
            data = p.read_bytes()
            if imaging.sniff_format(data) == "JPEG":
                try:
                    decode_rgb(data)
                except DecodeError:
                    continue  # the fixtures' deliberately corrupt files
                out.append(data)
    return out[:limit] if limit else out


def stage_hash(data: bytes, method: str) -> tuple[int, int]:
    img, full_size = decode_for_hash(data, method, {})
    return image_hashes(img, method, True, full_size)


def unit(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float64).reshape(-1)
    x = x - x.mean()
    return x / max(np.linalg.norm(x), 1e-12)


def agreement(blobs: list[bytes]) -> dict:
    out: dict = {"images": len(blobs)}
    full = [decode_rgb(b) for b in blobs]
    for method in ("phash", "dhash", "whash"):
        d, df = [], []
        for b, img in zip(blobs, full):
            value, mirrored = stage_hash(b, method)
            d.append(bin(value ^ image_hash(img, method)).count("1"))
            df.append(bin(mirrored ^ image_hash(ImageOps.mirror(img), method)).count("1"))
        d, df = np.array(d), np.array(df)
        out[method] = {
            "differs": round(float(np.mean(d > 0)), 4), "mean_bits": round(float(d.mean()), 3), "max_bits": int(d.max()),
            "beyond_radius_6": int(np.sum(d > RADIUS)),
            "mirror_differs": round(float(np.mean(df > 0)), 4), "mirror_max_bits": int(df.max()), "mirror_beyond_radius_6": int(np.sum(df > RADIUS)),
        }
    emb = build_embedder(PIXELS)
    cos = np.array([
        float(unit(emb.preprocess(decode_with_info(b, min_size=emb.decode_min_size, mode=emb.decode_mode)[0])) @ unit(emb.preprocess(img)))
        for b, img in zip(blobs, full)
    ])
    out["pixels_32_grey"] = {"min_cosine": round(float(cos.min()), 5), "below_0.99": int(np.sum(cos < 0.99)), "below_0.999": int(np.sum(cos < 0.999)),
                             "differs": round(float(np.mean(cos < 1 - 1e-6)), 4), "decode_min_size": list(emb.decode_min_size)}
    timm = build_embedder({"type": "timm", "name": "vit_tiny_patch16_224", "pretrained": False}, device="cpu")
    reduced = [(b, img) for b, img in zip(blobs, full) if decode_rgb(b, min_size=timm.decode_min_size).size != img.size]
    tcos = np.array([float(unit(timm.preprocess(decode_rgb(b, min_size=timm.decode_min_size))) @ unit(timm.preprocess(img))) for b, img in reduced])
    out["timm_224_input"] = {"scaled_decodes": len(reduced), "min_cosine": round(float(tcos.min()), 5) if len(tcos) else None,
                             "below_0.999": int(np.sum(tcos < 0.999)), "decode_min_size": list(timm.decode_min_size)}

    def rate(fn) -> float:
        t = time.process_time()
        for b in blobs:
            fn(b)
        return round(len(blobs) / (time.process_time() - t), 1)

    out["decode_images_per_cpu_s"] = {
        "full_rgb": rate(decode_rgb),
        "phash_path": rate(lambda b: decode_with_info(b, min_size=(128, 128), mode="L")),
        "pixels_path": rate(lambda b: decode_with_info(b, min_size=emb.decode_min_size, mode="L")),
        "timm_path": rate(lambda b: decode_rgb(b, min_size=timm.decode_min_size)),
    }
    return out


# -- dedup results -----------------------------------------------------------------------------
def stage_features(folder: Path, items: list[dict]) -> dict:
    ctx = StageContext(run_dir=folder, stage_dir=folder / "stage")
    table = pa.table({"uid": pa.array(range(len(items)), pa.int64()), "bytes": pa.array([(folder / it["file"]).read_bytes() for it in items], pa.binary())})
    feats = {}
    for method in ("phash", "dhash", "whash"):
        stage = PhashStage(PhashConfig(method=method, column=method), ctx)
        stage.setup()
        out = stage.process(table)
        feats[method] = np.array(out.column(method).to_pylist(), np.uint64)
        feats[f"{method}_flip"] = np.array(out.column(f"{method}_flip").to_pylist(), np.uint64)
    embed = EmbedStage(EmbedConfig.model_validate({"kind": "embed", "model": PIXELS, "dtype": "float32", "decode_threads": 1}), ctx)
    embed.setup()
    x = np.array(embed.process(table).column("embedding").to_pylist(), np.float32)
    feats["pixels"] = dq.normalize_rows(x)
    return feats


HEADLINE = ("ours phash r<=6", "ours phash+flip r<=6 (phash_dedup default)", "ours dhash+flip r<=6", "ours whash r<=6",
            "ours pca_hash pixels 64b r<=2", "ours knn cos>0.95 pixels", "ours knn cos>0.9 pixels")


def dedup_results(originals: int, distractors: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="decode_quality_") as tmp:
        folder = Path(tmp)
        items = dq.build_set(folder, originals, 4, distractors, 0)
        truth = dq.pairs_of_groups(np.array([it["group"] for it in items]))
        full, _ = dq.compute_features(folder, items)
        staged = stage_features(folder, items)
    out = {"images": len(items), "methods": {}}
    a = {r["method"]: r for r in dq.our_methods(full, items, truth, 0.0)}
    b = {r["method"]: r for r in dq.our_methods(staged, items, truth, 0.0)}
    for name in HEADLINE:
        out["methods"][name] = {
            "full_decode": {k: a[name]["groups"][k] for k in ("precision", "recall", "predicted_pairs")},
            "stage_decode": {k: b[name]["groups"][k] for k in ("precision", "recall", "predicted_pairs")},
        }
    for m in ("phash", "dhash", "whash"):
        d = np.array([bin(int(x) ^ int(y)).count("1") for x, y in zip(full[m], staged[m])])
        out[f"{m}_bits_vs_full"] = {"differs": round(float(np.mean(d > 0)), 4), "max_bits": int(d.max())}
    cos = np.sum(full["pixels"] * staged["pixels"], axis=1)
    out["pixels_cosine_vs_full"] = {"min": round(float(cos.min()), 5), "below_0.99": int(np.sum(cos < 0.99))}
    return out


# -- cut-short JPEGs -----------------------------------------------------------------------------
def cut_short(blobs: list[bytes]) -> dict:
    progressive = [bool(Image.open(io.BytesIO(b)).info.get("progressive")) for b in blobs]
    detected: dict[str, dict[str, list[int]]] = {}
    missed_rows: dict[str, list[int]] = {}  # of a missed baseline cut: bottom rows that differ
    for fraction in (0.5, 0.8, 0.95):
        key = f"cut_{int(fraction * 100)}"
        for b, prog in zip(blobs, progressive):
            damaged = b[: int(len(b) * fraction)] + b"\xff\xd9"
            try:
                img = decode_rgb(damaged)
                hit = 0
                if not prog:
                    diff = np.abs(np.asarray(img, np.int16) - np.asarray(decode_rgb(b), np.int16)).max(axis=(1, 2))
                    missed_rows.setdefault(key, []).append(int(len(diff) - np.flatnonzero(diff)[0]) if diff.any() else 0)
            except DecodeError as e:
                hit = int(e.reason == "truncated")
            detected.setdefault(key, {}).setdefault("progressive" if prog else "baseline", []).append(hit)
    confirmations = 0
    original = imaging._cut_short

    def counting(*args):
        nonlocal confirmations
        confirmations += 1
        return original(*args)

    imaging._cut_short = counting
    try:
        t = time.process_time()
        decoded = [Image.open(io.BytesIO(b)) for b in blobs]
        for im in decoded:
            im.load()
        decode_s = time.process_time() - t
        t = time.process_time()
        for im in decoded:
            imaging._filled_tail(im, 1)
        check_s = time.process_time() - t
        for b in blobs:
            decode_rgb(b)
    finally:
        imaging._cut_short = original
    return {
        "detected": {cut: {kind: f"{sum(v)}/{len(v)}" for kind, v in kinds.items()} for cut, kinds in detected.items()},
        "missed_baseline_cuts_damaged_bottom_rows_max": {cut: max(v) for cut, v in missed_rows.items()},
        "intact_files_confirmed_again": confirmations,
        "intact_files": len(blobs),
        "check_us_per_image": round(check_s / len(blobs) * 1e6, 1),
        "decode_us_per_image": round(decode_s / len(blobs) * 1e6, 1),
        "check_cost_vs_decode": round(check_s / decode_s, 4),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="200 photos, a small dedup set")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    blobs = real_jpegs(200 if args.quick else None)
    report = {"benchmark": "decode_quality", "agreement": agreement(blobs)}
    report["cut_short"] = cut_short(blobs)
    report["dedup"] = dedup_results(*((40, 100) if args.quick else (300, 1500)))

    a = report["agreement"]
    print(f"agreement with a full decode on {a['images']} real JPEGs")
    for m in ("phash", "dhash", "whash"):
        r = a[m]
        print(f"  {m}: differs {r['differs']:.1%}, max {r['max_bits']} bits, beyond r=6: {r['beyond_radius_6']}; mirror: differs {r['mirror_differs']:.1%}, max {r['mirror_max_bits']}")
    p = a["pixels_32_grey"]
    print(f"  pixels 32 grey (decoded >= {p['decode_min_size']}): min cosine {p['min_cosine']}, below 0.99: {p['below_0.99']}, differs {p['differs']:.1%}")
    t = a["timm_224_input"]
    print(f"  timm 224 input (decoded >= {t['decode_min_size']}): {t['scaled_decodes']} scaled decodes, min cosine {t['min_cosine']}")
    print(f"  decode images/cpu-s: {a['decode_images_per_cpu_s']}")
    c = report["cut_short"]
    print(f"cut-short JPEGs detected: {c['detected']}; missed baseline cuts damage at most {c['missed_baseline_cuts_damaged_bottom_rows_max']} bottom rows; intact files confirmed again: {c['intact_files_confirmed_again']}/{c['intact_files']}; "
          f"check {c['check_us_per_image']} us/image ({c['check_cost_vs_decode']:.2%} of a decode)")
    d = report["dedup"]
    print(f"dedup quality set ({d['images']} images): full decode vs the stages' decode (group pairs)")
    for name, r in d["methods"].items():
        f, s = r["full_decode"], r["stage_decode"]
        print(f"  {name:44s} P {f['precision']:.4f} -> {s['precision']:.4f}   R {f['recall']:.4f} -> {s['recall']:.4f}   pairs {f['predicted_pairs']} -> {s['predicted_pairs']}")
    write_result("decode_quality", report, args.out, quick=args.quick)


if __name__ == "__main__":
    main()
