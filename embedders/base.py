"""The one interface every image descriptor model follows.

Retrieval embeddings (``embed`` stage), copy-detection descriptors and the pixel descriptor for
PCA hashing all come from an ``Embedder``: ``preprocess`` turns one decoded RGB image into a
tensor (cheap, runs in decode threads), ``embed_preprocessed`` runs the model on many of them
(batched, on the GPU when there is one) and returns float32 rows of unit L2 norm, so that the
inner product of two rows is their cosine similarity everywhere downstream.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image


class EmbedderUnavailable(RuntimeError):
    """Weights or files a model needs are missing; the message says how to get them."""


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """CUDA when present unless told otherwise: the same config runs on a laptop and a GPU node."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Unit rows; an all-zero row stays zero instead of becoming NaN."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


class Embedder(ABC):
    """A descriptor model. Subclasses implement ``preprocess`` and ``_forward``."""

    #: Human-readable model identity, recorded in the manifest.
    name: str
    #: Output dimension.
    dim: int
    #: What ``preprocess`` wants from the decoder: "RGB" or "L" (grey, decoded as luma).
    decode_mode: str = "RGB"

    def __init__(self, device: str | torch.device | None = None, batch_size: int = 64):
        self.device = resolve_device(device)
        self.batch_size = int(batch_size)

    # -- to implement ---------------------------------------------------------------------
    @abstractmethod
    def preprocess(self, image: Image.Image) -> torch.Tensor:
        """One decoded RGB image to the model's input tensor (CHW, float32, on the CPU)."""

    @abstractmethod
    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        """A batch (NCHW, already on ``self.device``) to raw features [N, dim]."""

    # -- shared machinery -----------------------------------------------------------------
    @property
    def decode_min_size(self) -> tuple[int, int] | None:
        """The smallest decoded (width, height) that ``preprocess`` gives the same input from,
        up to rounding (JPEGs are decoded no larger; see ``curation.imaging.decode_rgb``).
        Read off ``self.transform`` when the embedder has one; None: decode at full size."""
        from embedders.preprocess import decode_min_size

        transform = getattr(self, "transform", None)
        return None if transform is None else decode_min_size(transform)

    def tensor_preprocess(self):
        """``preprocess`` as a function of a decoded uint8 CHW tensor on any device (for GPU
        decoding), or None when the preprocessing has no tensor form."""
        from embedders.preprocess import tensor_pipeline

        transform = getattr(self, "transform", None)
        return None if transform is None else tensor_pipeline(transform)

    def autocast(self):
        """bf16 on CUDA (tensor cores, no loss scaling needed for inference); fp32 on CPU, where
        bf16 autocast is slower than fp32 on most processors."""
        if self.device.type == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.inference_mode()
    def forward_batch(self, batch: torch.Tensor) -> np.ndarray:
        """Run one stacked batch; returns float32 unit rows on the CPU."""
        if batch.device == self.device:
            pass  # decoded on the device already
        elif self.device.type == "cuda":
            batch = batch.pin_memory().to(self.device, non_blocking=True)
        else:
            batch = batch.to(self.device)
        with self.autocast():
            feats = self._forward(batch)
        feats = torch.nn.functional.normalize(feats.float(), dim=1, eps=1e-12)
        return feats.cpu().numpy().astype(np.float32, copy=False)

    def embed_preprocessed(self, tensors: Sequence[torch.Tensor]) -> np.ndarray:
        """Embed preprocessed tensors in input order.

        Tensors of different shapes (e.g. SSCD's short-side resize keeps aspect ratios) are
        grouped by shape so that each model call sees one stackable batch.
        """
        out = np.zeros((len(tensors), self.dim), dtype=np.float32)
        if not tensors:
            return out
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault(tuple(t.shape), []).append(i)
        for idx in groups.values():
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                out[chunk] = self.forward_batch(torch.stack([tensors[i] for i in chunk]))
        return out

    def embed(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Decoded RGB images to float32 unit rows [len(images), dim]."""
        return self.embed_preprocessed([self.preprocess(im) for im in images])

    def describe(self) -> dict:
        """Facts for the manifest."""
        return {"name": self.name, "dim": self.dim, "device": str(self.device)}
