"""Evaluation of frozen features: k-NN, linear probe, and PCA pictures of patch features.

k-NN follows DINO: cosine similarity to the 20 nearest training features, votes weighted by
exp(similarity / 0.07). The linear probe trains one linear layer on frozen (class token, mean
patch token) features, picking lr and weight decay on a held-out part of the training split.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from curation.imaging import decode_rgb
from curation.train.data import LabelledImages, eval_transform, list_labelled_images, split_labelled

Features = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]  # images -> (cls, patches)


@dataclass
class Backbone:
    features: Features
    img_size: int
    patch_size: int
    device: torch.device


def from_training_vit(model, device) -> Backbone:
    """A backbone over our own ViT (a trainer's teacher, a random init or a loaded export)."""
    model = model.to(device).eval()

    def features(x):
        out = model.forward_features(x)
        return out["cls"], out["patches"]

    return Backbone(features, model.img_size, model.patch_size, device)


def load_backbone(path: str | Path, device: str | torch.device = "cpu") -> Backbone:
    """An exported backbone (``curation.vit/1``) or the teacher of a training checkpoint/run."""
    from curation.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
    from curation.train.config import TrainConfig
    from curation.train.export import EXPORT_FORMAT, load_exported
    from curation.train.vit import build_vit

    device = torch.device(device)
    path = Path(path)
    payload = load_checkpoint(path) if path.is_dir() else torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") == EXPORT_FORMAT:
        model = load_exported(path, device)
        n_prefix = model.num_prefix_tokens

        def features(x):
            tokens = model.forward_features(x)
            return tokens[:, 0], tokens[:, n_prefix:]

        kw = payload["model_kwargs"]
        return Backbone(features, kw["img_size"], kw["patch_size"], device)
    if payload.get("format") == CHECKPOINT_FORMAT:
        cfg = TrainConfig.model_validate(payload["config"])
        model = build_vit(cfg.model, cfg.crops.global_size)
        prefix = "backbone."
        model.load_state_dict({k[len(prefix) :]: v for k, v in payload["teacher"].items() if k.startswith(prefix)})
        return from_training_vit(model, device)
    raise ValueError(f"{path}: neither an exported backbone nor a training checkpoint")


def random_backbone(model_cfg, img_size: int, seed: int = 0, device: str | torch.device = "cpu") -> Backbone:
    """The same architecture at random initialisation: the baseline a trained backbone must beat."""
    from curation.train.vit import build_vit

    torch.manual_seed(seed)
    return from_training_vit(build_vit(model_cfg, img_size), torch.device(device))


# -- features ----------------------------------------------------------------------------------
@torch.no_grad()
def extract(backbone: Backbone, dataset, batch_size: int = 64, num_workers: int = 0, with_patches: bool = False):
    """L2-normalised class-token features (or [cls, mean patch] when ``with_patches``) and labels."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    feats, labels = [], []
    for x, y in loader:
        cls, patches = backbone.features(x.to(backbone.device))
        f = torch.cat([cls, patches.mean(dim=1)], dim=1) if with_patches else cls
        feats.append(f.float().cpu())
        labels.append(y)
    feats = torch.cat(feats)
    return (feats if with_patches else F.normalize(feats, dim=1)), torch.cat(labels)


def labelled_splits(data: str | Path, test_data: str | Path | None, test_fraction: float, seed: int = 0):
    """(train items, test items, classes): a separate test folder, or a deterministic split."""
    items = list_labelled_images(data)
    if test_data is not None:
        train, test = items, list_labelled_images(test_data)
    else:
        train, test = split_labelled(items, test_fraction, seed)
    classes = sorted({label for _, label in train + test})
    return train, test, classes


# -- k-NN --------------------------------------------------------------------------------------
def knn_classify(
    train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor, n_classes: int, k: int = 20, temperature: float = 0.07
) -> torch.Tensor:
    """Class scores (n_test, n_classes) from a similarity-weighted vote of the k nearest neighbours."""
    k = min(k, train_feats.shape[0])
    sims, idx = (test_feats @ train_feats.t()).topk(k, dim=1)
    weights = (sims / temperature).exp()
    votes = torch.zeros(test_feats.shape[0], n_classes)
    votes.scatter_add_(1, train_labels[idx], weights)
    return votes


def knn_accuracy(train_feats, train_labels, test_feats, test_labels, n_classes: int, k: int = 20, temperature: float = 0.07) -> dict:
    scores = knn_classify(train_feats, train_labels, test_feats, n_classes, k, temperature)
    top5 = scores.topk(min(5, n_classes), dim=1).indices
    return {
        "top1": float((scores.argmax(dim=1) == test_labels).float().mean()),
        "top5": float((top5 == test_labels[:, None]).any(dim=1).float().mean()),
        "k": k,
        "temperature": temperature,
        "n_train": int(train_feats.shape[0]),
        "n_test": int(test_feats.shape[0]),
    }


# -- linear probe ------------------------------------------------------------------------------
def _fit_linear(x: torch.Tensor, y: torch.Tensor, n_classes: int, lr: float, wd: float, epochs: int, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    head = nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=wd)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    for _ in range(epochs):  # full batch: frozen features of an evaluation set fit in memory
        opt.zero_grad()
        F.cross_entropy(head(x), y).backward()
        opt.step()
        sched.step()
    return head


def linear_probe(
    train_feats, train_labels, test_feats, test_labels, n_classes: int, epochs: int = 300,
    lrs: tuple[float, ...] = (1e-3, 1e-2, 1e-1), wds: tuple[float, ...] = (0.0, 1e-3, 1e-1), seed: int = 0,
) -> dict:
    """Accuracy of a linear classifier; lr and weight decay chosen on 20% of the training split."""
    mean, std = train_feats.mean(0), train_feats.std(0).clamp(min=1e-6)
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(len(xtr)))
    n_val = max(1, len(xtr) // 5)
    val, fit = perm[:n_val], perm[n_val:]
    best = (-1.0, lrs[0], wds[0])
    for lr in lrs:
        for wd in wds:
            head = _fit_linear(xtr[fit], train_labels[fit], n_classes, lr, wd, epochs, seed)
            with torch.no_grad():
                acc = float((head(xtr[val]).argmax(1) == train_labels[val]).float().mean())
            if acc > best[0]:
                best = (acc, lr, wd)
    head = _fit_linear(xtr, train_labels, n_classes, best[1], best[2], epochs, seed)
    with torch.no_grad():
        acc = float((head(xte).argmax(1) == test_labels).float().mean())
    return {"top1": acc, "val_top1": best[0], "lr": best[1], "weight_decay": best[2], "epochs": epochs,
            "n_train": int(len(xtr)), "n_test": int(len(xte))}


def evaluate_folder(backbone: Backbone, data, test_data=None, test_fraction: float = 0.2, size: int | None = None,
                    batch_size: int = 64, num_workers: int = 0, which: tuple[str, ...] = ("knn", "linear"), k: int = 20,
                    temperature: float = 0.07, linear_epochs: int = 300) -> dict:
    """k-NN and/or linear accuracy on a labelled folder with its deterministic split."""
    size = size or backbone.img_size
    train, test, classes = labelled_splits(data, test_data, test_fraction)
    dtr, dte = LabelledImages(train, classes, size), LabelledImages(test, classes, size)
    out: dict = {"classes": len(classes), "size": size}
    if "knn" in which:
        ftr, ytr = extract(backbone, dtr, batch_size, num_workers)
        fte, yte = extract(backbone, dte, batch_size, num_workers)
        out["knn"] = knn_accuracy(ftr, ytr, fte, yte, len(classes), k, temperature)
    if "linear" in which:
        ftr, ytr = extract(backbone, dtr, batch_size, num_workers, with_patches=True)
        fte, yte = extract(backbone, dte, batch_size, num_workers, with_patches=True)
        out["linear"] = linear_probe(ftr, ytr, fte, yte, len(classes), epochs=linear_epochs)
    out["chance"] = 1.0 / len(classes)
    return out


# -- PCA of patch features ---------------------------------------------------------------------
@torch.no_grad()
def pca_images(backbone: Backbone, images: list[Path], output_dir: str | Path, size: int = 448,
               foreground_threshold: float | None = 0.0) -> list[Path]:
    """PNG per image: the image beside its patches coloured by the first three PCA components.

    The components are fitted on the patches of all given images together, so colours mean the
    same parts across images (as in the DINOv2 figures). With ``foreground_threshold`` the first
    component separates foreground from background and the three colours are fitted on the
    foreground only; the background is drawn black.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    size = size // backbone.patch_size * backbone.patch_size
    grid = size // backbone.patch_size
    transform = eval_transform(size)
    pictures, feats = [], []
    for p in images:
        img = decode_rgb(Path(p).read_bytes())
        x = transform(img).unsqueeze(0).to(backbone.device)
        _, patches = backbone.features(x)
        feats.append(patches[0].float().cpu())
        pictures.append(transform.transforms[1](transform.transforms[0](img)))  # resized, centre-cropped
    all_patches = torch.cat(feats)
    mean = all_patches.mean(0)
    _, _, v = torch.pca_lowrank(all_patches - mean, q=3, center=False)
    first = (all_patches - mean) @ v[:, 0]
    if first.median() > 0:  # sign is arbitrary: make the majority (background) negative
        first = -first
    fg = first > foreground_threshold if foreground_threshold is not None else torch.ones_like(first, dtype=torch.bool)
    if fg.sum() >= 3 and foreground_threshold is not None:
        fmean = all_patches[fg].mean(0)
        _, _, v = torch.pca_lowrank(all_patches[fg] - fmean, q=3, center=False)
        mean = fmean
    comps = (all_patches - mean) @ v[:, :3]
    lo, hi = comps[fg].min(0).values, comps[fg].max(0).values
    rgb = ((comps - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)
    rgb[~fg] = 0
    written, start = [], 0
    for p, pic in zip(images, pictures):
        n = grid * grid
        tile = (rgb[start : start + n].reshape(grid, grid, 3).numpy() * 255).astype(np.uint8)
        start += n
        pca_img = Image.fromarray(tile).resize((size, size), Image.NEAREST)
        canvas = Image.new("RGB", (2 * size, size))
        canvas.paste(pic, (0, 0))
        canvas.paste(pca_img, (size, 0))
        tag = hashlib.sha1(str(p).encode()).hexdigest()[:8]
        out = output_dir / f"{Path(p).stem}-{tag}_pca.png"
        canvas.save(out)
        written.append(out)
    return written


def image_paths(inputs: list[str | Path]) -> list[Path]:
    from curation.train.data import IMAGE_SUFFIXES

    paths: list[Path] = []
    for item in inputs:
        item = Path(item)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif item.is_file():
            paths.append(item)
        else:
            raise FileNotFoundError(f"{item}: no such image or folder")
    return paths
