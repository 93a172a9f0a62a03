"""Training and inference speed of the trainer's ViT: fused SDPA vs the math kernel, packed vs
separate crop passes (packed through the fused path, through nested jagged tensors, and the old
dense block-diagonal mask as the reference), skip-compute vs masked stochastic depth.

Training step = student backbone forward on a DINO multi-crop batch (2 global + N local crops
per image, iBOT masks on the global crops) + backward; inference = class and patch tokens of one
224 px view without gradients. Figures are images per second (an image = all of its crops for
training). Ratios compare two settings measured in the same run.

    python benchmarks/train_speed.py            # ViT-S/8 and ViT-S/14 at 224/96 (GPU)
    python benchmarks/train_speed.py --quick    # small widths and crops (CPU, a few minutes)
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import statistics
import time
from typing import Callable

import torch

from curation.train.vit import VisionTransformer, dense_mask_features
from common import device_name, git_commit, write_result  # noqa: E402  (benchmarks/ is on sys.path)



def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[tuple, Callable[[], None]], device, warmup: int, rounds: int) -> dict[tuple, float]:
    """Seconds per call of each function: median over ``rounds`` rounds that call every function
    once in turn, so that drift of a shared machine (clocks, other jobs) falls on all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times: dict[tuple, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[key].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# How the crops of a training step go through the network:
#   separate       each crop size as its own batch (a pass per size)
#   packed         one pass, attention per crop with one fused SDPA call per crop size (the default packing)
#   packed_jagged  one pass, attention in one SDPA call on nested jagged tensors
#   dense_mask     one pass per image sequence with a dense block-diagonal mask (the reference packing)
LAYOUTS = ("separate", "packed", "packed_jagged", "dense_mask")


def make_vit(spec: dict, patch: int, global_size: int, attention: str, layout: str, skip: bool, drop: float) -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=global_size, patch_size=patch, embed_dim=spec["dim"], depth=spec["depth"], num_heads=spec["heads"],
        drop_path_rate=drop, skip_drop_compute=skip, attention=attention, packing=layout in ("packed", "packed_jagged"),
        packed_attention="jagged" if layout == "packed_jagged" else "by_size",
    )


def bench_model(name: str, patch: int, args, device: torch.device, dtype) -> list[dict]:
    spec = {"dim": args.dim, "depth": args.depth, "heads": args.heads}
    g = round(args.global_size / patch) * patch  # 224 for /8 and /14
    l = round(args.local_size / patch) * patch  # 96 for /8, 98 for /14 (as DINOv2)
    b, n_local = args.batch, args.n_local
    globals_ = torch.randn(2 * b, 3, g, g, device=device)
    locals_ = torch.randn(n_local * b, 3, l, l, device=device)
    grid = g // patch
    masks = torch.rand(2 * b, grid * grid, device=device) < 0.3
    masks[b:] = False  # half the global crops masked, as DINOv2
    x_infer = torch.randn(args.infer_batch, 3, g, g, device=device)

    def autocast():
        return torch.autocast(device.type, dtype=dtype) if dtype is not None else torch.autocast(device.type, enabled=False)

    def train_step(vit, layout):
        def step():
            with autocast():
                if layout == "dense_mask":
                    outs = dense_mask_features(vit, [globals_, locals_], [masks, None], [2, n_local])
                else:
                    outs = vit.forward_features_list([globals_, locals_], [masks, None])
                loss = sum(o["cls"].float().mean() + o["patches"].float().mean() for o in outs)
            loss.backward()
            vit.zero_grad(set_to_none=True)
        return step

    def infer_step(vit):
        @torch.no_grad()
        def step():
            with autocast():
                vit.forward_features(x_infer)
        return step

    train_keys = list(itertools.product(("default", "math"), ("separate", "packed"), (True, False)))
    train_keys += [("default", "packed_jagged", True), ("default", "dense_mask", True), ("math", "dense_mask", True)]
    fns = {
        ("train",) + k: train_step(make_vit(spec, patch, g, k[0], k[1], k[2], args.drop_path).to(device).train(), k[1])
        for k in train_keys
    }
    fns.update({("inference", a, "separate", None): infer_step(make_vit(spec, patch, g, a, "separate", True, 0.0).to(device).eval()) for a in ("default", "math")})
    seconds = interleaved(fns, device, args.warmup, args.iters)
    rows = []
    for (mode, attention, layout, skip), sec in seconds.items():
        n = b if mode == "train" else args.infer_batch
        rows.append({"model": name, "mode": mode, "attention": attention, "layout": layout, "skip_drop": skip,
                     "images_per_s": n / sec, "ms_per_step": 1000 * sec})
        print(f"{name:10s} {mode:9s} attention={attention:7s} layout={layout:13s} skip_drop={skip!s:5s} {n / sec:9.1f} img/s")
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Pairs that differ in one setting, others held at the DINOv2 choice (fused, skip-compute)."""
    def find(**kw):
        return next(r["images_per_s"] for r in rows if all(r[k] == v for k, v in kw.items()))

    def train(model, attention="default", layout="separate", skip=True):
        return find(model=model, mode="train", attention=attention, layout=layout, skip_drop=skip)

    out = []
    for model in sorted({r["model"] for r in rows}):
        def add(what, ratio):
            out.append({"model": model, "what": what, "ratio": ratio})

        for layout in ("separate", "packed", "dense_mask"):
            add(f"train: fused SDPA / math ({layout})", train(model, layout=layout) / train(model, "math", layout))
        add("inference: fused SDPA / math",
            find(model=model, mode="inference", attention="default") / find(model=model, mode="inference", attention="math"))
        add("train: packed (fused, per crop size) / separate", train(model, layout="packed") / train(model))
        add("train: packed (fused, per crop size) / packed with a dense mask", train(model, layout="packed") / train(model, layout="dense_mask"))
        add("train: packed (jagged) / separate", train(model, layout="packed_jagged") / train(model))
        add("train: packed with a dense mask / separate", train(model, layout="dense_mask") / train(model))
        add("train: packed / separate (math)", train(model, "math", "packed") / train(model, "math"))
        add("train: skip-compute / masked stochastic depth", train(model) / train(model, skip=False))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small widths and crops, for a CPU")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (each calls every variant once)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--batch", type=int, default=None, help="images per training step")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default="bf16", help="autocast dtype on CUDA")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        defaults = dict(dim=96, depth=4, heads=3, global_size=64, local_size=32, n_local=4, batch=8, infer_batch=16, iters=15, warmup=2)
    else:
        defaults = dict(dim=384, depth=12, heads=6, global_size=224, local_size=96, n_local=8, batch=32, infer_batch=128, iters=20, warmup=5)
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    args.drop_path = 0.4  # DINOv2 ViT-g rate; the skip saves ~this share of branch compute
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision) if device.type == "cuda" else None
    rows = bench_model("ViT-S/8", 8, args, device, dtype) + bench_model("ViT-S/14", 14, args, device, dtype)
    table = ratios(rows)
    print("\n| model | comparison | ratio |\n|---|---|---|")
    for r in table:
        print(f"| {r['model']} | {r['what']} | {r['ratio']:.2f} |")
    result = {
        "benchmark": "train_speed", "device": device_name(device), "date": dt.datetime.now(dt.timezone.utc).isoformat(),
        "commit": git_commit(), "torch": torch.__version__, "quick": args.quick,
        "settings": {k: getattr(args, k) for k in ("dim", "depth", "heads", "global_size", "local_size", "n_local", "batch", "infer_batch", "iters", "warmup", "drop_path", "precision")},
        "rows": rows, "ratios": table,
        "note": "crop sizes are rounded to a multiple of the patch (local 98 for /14); CPU figures are timed on a shared machine. "
                "On CPU the fused SDPA kernel also accepts a dense mask, so there 'packed / dense mask' measures the masked-out work, "
                "not the kernel choice; on CUDA the dense mask rules out flash attention. CPU runs nested jagged tensors "
                "through an unfused per-crop loop (CUDA: variable-length flash).",
    }
    write_result("train_speed", result, quick=args.quick)


if __name__ == "__main__":
    main()
