"""Command line: ``train``, ``export`` and ``eval {knn,linear,pca}``.

``curation.cli`` (the ``curate`` script) registers these with :func:`add_subcommands`; until then,
and under torchrun, run ``python -m curation.train.cli <command> ...``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path


def _cmd_train(args: argparse.Namespace) -> int:
    from curation.train.config import load_config
    from curation.train.trainer import train

    overrides = list(args.set or [])
    for flag, key in (("arch", "model.arch"), ("patch_size", "model.patch_size"), ("batch_size", "optim.batch_size"),
                      ("epochs", "optim.epochs"), ("max_iters", "max_iters"), ("num_workers", "data.num_workers"),
                      ("strategy", "strategy"), ("distill_from", "distill.teacher")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"{key}={json.dumps(value) if isinstance(value, str) else value}")
    if args.packing is not None:
        overrides += ["model.packing=true", f"model.packed_attention={args.packing}"]
    cfg = load_config(args.config, overrides)
    summary = train(cfg, args.manifest, args.output, resume=not args.no_resume)
    print(json.dumps({"output": str(args.output), **summary}, default=str))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from curation.train.export import export_checkpoint

    out = export_checkpoint(args.checkpoint, args.output)
    print(json.dumps({"exported": str(out)}))
    return 0


def _backbone(args: argparse.Namespace):
    import torch

    from curation.train.evaluate import load_backbone, random_backbone

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backbone = load_backbone(args.checkpoint, device)
    if args.random_init:  # same architecture, untrained: the baseline
        from curation.train.checkpoint import load_checkpoint
        from curation.train.config import TrainConfig

        cfg = TrainConfig.model_validate(load_checkpoint(args.checkpoint)["config"])
        backbone = random_backbone(cfg.model, cfg.crops.global_size, device=device)
    return backbone


def _cmd_eval_classify(which: str):
    def run(args: argparse.Namespace) -> int:
        from curation.train.evaluate import evaluate_folder

        result = evaluate_folder(
            _backbone(args), args.data, args.test_data, args.test_fraction, args.size, args.batch_size, args.num_workers,
            which=(which,), k=getattr(args, "k", 20), temperature=getattr(args, "temperature", 0.07),
            linear_epochs=getattr(args, "epochs", 300),
        )
        text = json.dumps(result, indent=2)
        if args.json:
            Path(args.json).write_text(text)
        print(text)
        return 0

    return run


def _cmd_eval_pca(args: argparse.Namespace) -> int:
    from curation.train.evaluate import image_paths, pca_images

    threshold = None if args.no_foreground else args.foreground_threshold
    written = pca_images(_backbone(args), image_paths(args.images), args.output, args.size, threshold)
    print(json.dumps({"written": [str(p) for p in written]}))
    return 0


def _common_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="exported backbone (.pt) or training run / checkpoint")
    p.add_argument("--random-init", action="store_true", help="same architecture at random initialisation (baseline; needs a training checkpoint)")
    p.add_argument("--device", default=None)


def _classify_args(p: argparse.ArgumentParser) -> None:
    _common_eval(p)
    p.add_argument("--data", required=True, help="labelled folder: <data>/<class>/<image>")
    p.add_argument("--test-data", default=None, help="separate labelled test folder (default: split --data)")
    p.add_argument("--test-fraction", type=float, default=0.2)
    p.add_argument("--size", type=int, default=None, help="eval resolution (default: the training size)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result here")


def add_subcommands(subparsers) -> None:
    """Register ``train``, ``export`` and ``eval`` on an argparse subparsers object."""
    p = subparsers.add_parser("train", help="DINOv2 pretraining on a curated manifest")
    p.add_argument("--manifest", required=True, help="OUT/manifest.json written by `curate run`")
    p.add_argument("--output", required=True, help="run directory (checkpoints, log); resumed if it holds one")
    p.add_argument("--config", default=None, help="YAML/JSON training config (curation.train.config.TrainConfig)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override, e.g. --set model.patch_size=14")
    p.add_argument("--arch", default=None, choices=["vit_small", "vit_base", "vit_large", "vit_giant"])
    p.add_argument("--patch-size", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None, help="images per process")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--max-iters", type=int, default=None)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--strategy", choices=["ddp", "fsdp"], default=None,
                   help="ddp: replicate (default); fsdp: shard student, teacher and optimizer with FSDP2 (mixed precision: fsdp.* in the config)")
    p.add_argument("--distill-from", default=None, metavar="CHECKPOINT",
                   help="distil from this frozen teacher: a `curate train` run or checkpoint, a `curate export` file, "
                        "or timm:<model>[@<weights file>]; the EMA of the student is the model to export")
    p.add_argument("--packing", choices=["by_size", "jagged"], default=None,
                   help="global and local crops through each block in one pass; attention per crop with one fused SDPA "
                        "call per crop size (by_size) or one call on nested jagged tensors")
    p.add_argument("--no-resume", action="store_true", help="start afresh even if the run directory holds a checkpoint")
    p.set_defaults(func=_cmd_train)

    p = subparsers.add_parser("export", help="write the teacher backbone as a timm-loadable checkpoint")
    p.add_argument("--checkpoint", required=True, help="training run directory or checkpoint file")
    p.add_argument("--output", required=True, help="the .pt file to write (format curation.vit/1)")
    p.set_defaults(func=_cmd_export)

    p = subparsers.add_parser("eval", help="evaluate frozen features")
    evals = p.add_subparsers(dest="eval_command", required=True)
    q = evals.add_parser("knn", help="k-NN accuracy (weighted vote, as DINO)")
    _classify_args(q)
    q.add_argument("--k", type=int, default=20)
    q.add_argument("--temperature", type=float, default=0.07)
    q.set_defaults(func=_cmd_eval_classify("knn"))
    q = evals.add_parser("linear", help="linear-probe accuracy on frozen features")
    _classify_args(q)
    q.add_argument("--epochs", type=int, default=300, help="full-batch epochs per lr/weight-decay candidate")
    q.set_defaults(func=_cmd_eval_classify("linear"))
    q = evals.add_parser("pca", help="PNGs of the first three PCA components of patch features")
    _common_eval(q)
    q.add_argument("--images", nargs="+", required=True, help="image files or folders")
    q.add_argument("--output", required=True, help="folder for the PNGs")
    q.add_argument("--size", type=int, default=448)
    q.add_argument("--foreground-threshold", type=float, default=0.0, help="on the first component")
    q.add_argument("--no-foreground", action="store_true", help="colour every patch, no foreground split")
    q.set_defaults(func=_cmd_eval_pca)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(prog="python -m curation.train.cli", description=__doc__)
    add_subcommands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
