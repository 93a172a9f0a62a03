"""Image descriptor models: retrieval embeddings (timm), copy detection (SSCD), pixels (PCA hash).

Build one from a YAML-style spec with ``build_embedder({"type": "timm", "name": ...})``; every
embedder returns float32 rows of unit L2 norm (see ``embedders.base.Embedder``).
"""

from embedders.base import Embedder, EmbedderUnavailable, l2_normalise, resolve_device
from embedders.registry import (
    EmbedderSpec,
    PixelsSpec,
    SscdSpec,
    TimmSpec,
    build_embedder,
    check_available,
    output_dim,
    parse_spec,
)
from embedders.timm_model import DEFAULT_RETRIEVAL_MODEL, TRAINER_FORMAT

__all__ = [
    "DEFAULT_RETRIEVAL_MODEL",
    "TRAINER_FORMAT",
    "Embedder",
    "EmbedderSpec",
    "EmbedderUnavailable",
    "PixelsSpec",
    "SscdSpec",
    "TimmSpec",
    "build_embedder",
    "check_available",
    "l2_normalise",
    "output_dim",
    "parse_spec",
    "resolve_device",
]
