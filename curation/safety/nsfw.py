"""The NSFW classifier interface and its registry.

A backend turns decoded RGB images into the probability that each one is NSFW. The stage owns
everything else (decoding, batching, the threshold, the ledger), so adding a classifier means
writing one ``NsfwBackend`` subclass decorated with ``@register_backend``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


class NsfwBackend(ABC):
    """One NSFW classifier with its own weights file and preprocessing."""

    name: ClassVar[str]
    # Human-readable model description for the manifest.
    description: ClassVar[str] = ""
    # The smallest decoded (width, height) ``preprocess`` gives the same input from, up to
    # rounding; JPEGs are decoded no larger (None: full size).
    decode_min_size: ClassVar[tuple[int, int] | None] = None

    @classmethod
    @abstractmethod
    def default_weights_path(cls) -> Path:
        """Where the backend's own library looks for its weights."""

    @classmethod
    @abstractmethod
    def download_hint(cls) -> str:
        """Where a user can get the weights file (URL and file name)."""

    @classmethod
    def weights_problem(cls, path: Path) -> str | None:
        """Why ``path`` cannot be loaded (missing, a directory, not the expected format), or None.

        Cheap on purpose: it runs on the driver before any work.
        """
        if not path.exists():
            return f"no weights file at {path}"
        if not path.is_file():
            return f"{path} is not a file"
        return None

    @abstractmethod
    def __init__(self, weights: Path, device: str):
        """Load the model from ``weights`` onto ``device`` ('cpu' or 'cuda')."""

    @abstractmethod
    def preprocess(self, image: Image.Image) -> np.ndarray:
        """One RGB image (EXIF orientation applied) to the model's input array."""

    @abstractmethod
    def predict(self, batch: np.ndarray) -> np.ndarray:
        """A stack of ``preprocess`` outputs to float32 NSFW probabilities in [0, 1]."""


def hdf5_problem(path: Path) -> str | None:
    """A truncated download or an HTML error page saved as ``.h5`` is the usual broken file."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_HDF5_SIGNATURE))
    except OSError as e:
        return f"cannot read {path}: {e}"
    if head != _HDF5_SIGNATURE:
        return f"{path} is not an HDF5 weights file (a failed download saves an error page)"
    return None


_BACKENDS: dict[str, type[NsfwBackend]] = {}


def register_backend(cls: type[NsfwBackend]) -> type[NsfwBackend]:
    if cls.name in _BACKENDS and _BACKENDS[cls.name] is not cls:
        raise ValueError(f"NSFW backend {cls.name!r} is registered twice")
    _BACKENDS[cls.name] = cls
    return cls


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def backend_class(name: str) -> type[NsfwBackend]:
    try:
        return _BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown NSFW backend {name!r}; available: {', '.join(available_backends())}") from None


# Built-in backends register themselves on import (their heavy imports happen on load only).
from curation.safety import opennsfw2_backend as _opennsfw2_backend  # noqa: E402,F401
