"""Downscaled pixels as a descriptor: what PCA hashing projects when no model is configured.

A tiny thumbnail (e.g. 32x32 grey or 16x16 RGB) keeps the layout and tones that survive
re-encoding and resizing, which is what a near-duplicate hash must be invariant to. Mean
centring removes global brightness; the L2 norm removes contrast, so the inner product of two
descriptors is the Pearson correlation of the two thumbnails.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from embedders.base import Embedder

# A JPEG is decoded no smaller than this many times the thumbnail: BOX-averaging DCT-scaled
# pixels spreads each output pixel over whole decoded pixels, and at 6x the descriptor keeps a
# cosine >= 0.99 to the full decode's on every photo of ../shared/data (4x: 99.7% of them;
# benchmarks/decode_quality.py).
DRAFT_FACTOR = 6


class PixelsEmbedder(Embedder):
    def __init__(self, size: int = 32, grayscale: bool = True, device=None, batch_size: int = 1024):
        # Arithmetic this small is faster on the CPU than a host-to-GPU copy.
        super().__init__(device or "cpu", batch_size)
        self.size = int(size)
        self.grayscale = bool(grayscale)
        self.dim = self.size * self.size * (1 if self.grayscale else 3)
        self.name = f"pixels:{self.size}x{self.size}{'-gray' if self.grayscale else '-rgb'}"
        self.decode_mode = "L" if self.grayscale else "RGB"

    @property
    def decode_min_size(self) -> tuple[int, int]:
        side = self.size * DRAFT_FACTOR
        return (side, side)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        img = image.convert("L") if self.grayscale else image.convert("RGB")
        # BOX averages every source pixel: the thumbnail does not alias on large images.
        img = img.resize((self.size, self.size), Image.Resampling.BOX)
        arr = np.asarray(img, dtype=np.float32).reshape(-1) / 255.0
        return torch.from_numpy(arr.copy())

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return batch - batch.mean(dim=1, keepdim=True)
