"""DINO multi-crop augmentation and iBOT block masks.

Two global crops (scale 0.32-1 in DINOv2) and N local crops (0.05-0.32), each with a flip,
colour jitter (0.4, 0.4, 0.2, 0.1; p=0.8), grayscale (p=0.2), Gaussian blur (p=1.0 for the first
global crop, 0.1 for the second, 0.5 for local crops) and solarisation (p=0.2, second global
crop only), then ImageNet normalisation. Randomness comes from a seed per sample so that a
sample's crops do not depend on the worker, the process count or a resume.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _blur(p: float) -> T.RandomApply:
    return T.RandomApply([T.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=p)


class MultiCrop:
    def __init__(
        self,
        global_size: int = 224,
        local_size: int = 96,
        n_local: int = 8,
        global_scale: tuple[float, float] = (0.32, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.32),
    ):
        self.n_local = n_local
        flip_jitter = T.Compose(
            [
                T.RandomHorizontalFlip(p=0.5),
                T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
                T.RandomGrayscale(p=0.2),
            ]
        )
        normalize = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
        bicubic = T.InterpolationMode.BICUBIC
        self.global1 = T.Compose(
            [T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic), flip_jitter, _blur(1.0), normalize]
        )
        self.global2 = T.Compose(
            [
                T.RandomResizedCrop(global_size, scale=global_scale, interpolation=bicubic),
                flip_jitter,
                _blur(0.1),
                T.RandomSolarize(threshold=128, p=0.2),
                normalize,
            ]
        )
        self.local = T.Compose(
            [T.RandomResizedCrop(local_size, scale=local_scale, interpolation=bicubic), flip_jitter, _blur(0.5), normalize]
        )

    def __call__(self, img: Image.Image, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(global crops, local crops) for one image, a pure function of ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            globals_ = [self.global1(img), self.global2(img)]
            locals_ = [self.local(img) for _ in range(self.n_local)]
        return globals_, locals_


def block_mask(grid: int, n_masked: int, rng: np.random.Generator, min_block: int = 4, max_aspect: float = 3.0) -> np.ndarray:
    """BEiT/iBOT-style mask: random rectangles of patches until ``n_masked`` are covered."""
    mask = np.zeros((grid, grid), dtype=bool)
    n_masked = min(n_masked, grid * grid)
    log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))
    for _ in range(100 * max(n_masked, 1)):
        todo = n_masked - int(mask.sum())
        if todo <= 0:
            break
        area = rng.uniform(min(min_block, todo), todo)
        aspect = math.exp(rng.uniform(*log_aspect))
        h = int(round(math.sqrt(area * aspect)))
        w = int(round(math.sqrt(area / aspect)))
        if not (1 <= h <= grid and 1 <= w <= grid):
            continue
        top, left = rng.integers(0, grid - h + 1), rng.integers(0, grid - w + 1)
        patch = mask[top : top + h, left : left + w]
        new = (~patch).sum()
        if 0 < new <= todo:
            patch[:] = True
    todo = n_masked - int(mask.sum())
    if todo > 0:  # rectangles could not fit exactly: finish with single patches
        free = np.flatnonzero(~mask.ravel())
        mask.ravel()[rng.choice(free, size=todo, replace=False)] = True
    return mask


def batch_masks(
    n_crops: int, grid: int, ratio: tuple[float, float], probability: float, rng: np.random.Generator
) -> torch.Tensor:
    """(n_crops, grid*grid) masks: ``int(n_crops * probability)`` crops masked, ratios spread
    evenly over ``ratio`` as DINOv2's collate does, the others unmasked, in random order."""
    n_patches = grid * grid
    n_masked_crops = int(n_crops * probability)
    ratios = np.linspace(ratio[0], ratio[1], n_masked_crops + 1)
    masks = [block_mask(grid, int(n_patches * rng.uniform(ratios[i], ratios[i + 1])), rng) for i in range(n_masked_crops)]
    masks += [np.zeros((grid, grid), dtype=bool)] * (n_crops - n_masked_crops)
    order = rng.permutation(n_crops)
    return torch.from_numpy(np.stack([masks[i] for i in order]).reshape(n_crops, n_patches))
