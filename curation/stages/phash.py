"""Perceptual hash of every image (imagehash pHash by default; dHash or wHash selectable).

64-bit hashes (imagehash ``hash_size=8``) stored as a uint64 column whose bit order is the hex
string imagehash prints, so values can be compared with other imagehash-based tools.
With ``flip`` (default) the hash of the mirrored image is stored too: mirrored copies are
common on the web and a global perceptual hash is not flip-invariant. Near-duplicates are found
later by the global ``phash_dedup`` stage.

Each hash first reduces the image to a small grey thumbnail (32x32 for pHash); the stage makes
that thumbnail once, for the hash and for its mirror (resizing commutes with mirroring, so both
equal imagehash's own values), from a JPEG decoded at no less than ``DRAFT_SIDE`` pixels a side
(four times pHash's thumbnail; whash's own scale when that is larger), luma only for pHash and
dHash: libjpeg's DCT scaling skips most of the decode, and on ../shared/data every pHash and
dHash stays within 5 bits of the full-decode hash (``benchmarks/decode_quality.py``). wHash
decodes RGB: its median split of near-equal wavelet coefficients moved up to 33 bits on 0.5% of
photos when fed libjpeg's luma instead of Pillow's conversion.
"""

from __future__ import annotations

from typing import Literal

import imagehash
import numpy as np
import pyarrow as pa
from PIL import Image, ImageOps
from pydantic import Field

from curation import schema
from curation.imaging import DecodeError, decode_with_info
from curation.stage import MapStage, Resources
from curation.stages._images import ImageStageConfig, error_details

HASH_FUNCTIONS = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
}
HASH_SIZE = 8  # 8 x 8 = 64 bits, one uint64
DRAFT_SIDE = 128


class PhashConfig(ImageStageConfig):
    kind: Literal["phash"] = "phash"
    method: Literal["phash", "dhash", "whash"] = Field("phash", description="imagehash function")
    column: str = Field("phash", description="uint64 output column")
    flip: bool = Field(True, description="also hash the mirrored image into `<column>_flip`, so phash_dedup catches flipped copies")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="workers at once (tasks on CPU, actors on GPU); 0 = one per CPU")


def flip_column(column: str) -> str:
    return f"{column}_flip"


def image_hash(image, method: str = "phash") -> int:
    """64-bit perceptual hash of a PIL image as an unsigned integer."""
    return _as_int(HASH_FUNCTIONS[method](image, hash_size=HASH_SIZE))


def _as_int(h: imagehash.ImageHash) -> int:
    return int.from_bytes(np.packbits(h.hash.reshape(-1)).tobytes(), "big")


def thumbnail_size(method: str, width: int, height: int) -> tuple[int, int]:
    """The grey thumbnail imagehash resizes to before hashing an image of this size."""
    if method == "phash":
        return (HASH_SIZE * 4, HASH_SIZE * 4)  # imagehash's highfreq_factor
    if method == "dhash":
        return (HASH_SIZE + 1, HASH_SIZE)
    scale = max(2 ** int(np.log2(min(width, height))), HASH_SIZE)  # whash's image_scale
    return (scale, scale)


def draft_size(method: str, width: int, height: int) -> tuple[int, int]:
    """The smallest decoded size the hash of a ``width`` x ``height`` image is computed from."""
    tw, th = thumbnail_size(method, width, height)
    return (max(tw, DRAFT_SIDE), max(th, DRAFT_SIDE))


def decode_for_hash(data: bytes, method: str, limits: dict) -> tuple[Image.Image, tuple[int, int]]:
    """The image ``image_hashes`` needs for ``method`` and the full upright size."""
    img, info = decode_with_info(data, **limits, min_size=lambda w, h: draft_size(method, w, h), mode="RGB" if method == "whash" else "L")
    return img, (info.width, info.height)


def image_hashes(image: Image.Image, method: str, flip: bool, full_size: tuple[int, int] | None = None) -> tuple[int, int | None]:
    """``image_hash`` of the image and of its mirror, from one shared thumbnail.

    ``full_size`` is the size of the image before any scaled decode (whash derives its
    thumbnail size from it)."""
    size = thumbnail_size(method, *(full_size or image.size))
    thumb = image.convert("L").resize(size, Image.Resampling.LANCZOS)  # as imagehash does first
    fn = HASH_FUNCTIONS[method]
    kwargs = {"image_scale": size[0]} if method == "whash" else {}
    value = _as_int(fn(thumb, hash_size=HASH_SIZE, **kwargs))
    return value, (_as_int(fn(ImageOps.mirror(thumb), hash_size=HASH_SIZE, **kwargs)) if flip else None)


class PhashStage(MapStage):
    kind = "phash"
    Config = PhashConfig

    def input_columns(self):
        return (schema.BYTES,)

    def output_schema(self) -> pa.Schema:
        fields = [pa.field(self.config.column, pa.uint64())]
        if self.config.flip:
            fields.append(pa.field(flip_column(self.config.column), pa.uint64()))
        return pa.schema(fields)

    def resources(self) -> Resources:
        n = self.config.workers or max(1, self.context.cluster_cpus)
        return Resources(num_cpus=1, concurrency=(1, n), batch_size=self.config.batch_size)

    def process(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        hashes, flipped, reasons, details = [], [], [], []

        for data in batch.column(schema.BYTES).to_pylist():
            try:
                img, full_size = decode_for_hash(data or b"", cfg.method, cfg.decode_limits)
            except DecodeError as e:  # normally caught by `decode` already; keep the ledger honest
                hashes.append(None)
                flipped.append(None)
                reasons.append(e.reason)
                details.append(error_details(e, self.name))
                continue
            value, mirrored = image_hashes(img, cfg.method, cfg.flip, full_size)
            hashes.append(value)
            flipped.append(mirrored)
            reasons.append(None)
            details.append(None)
        columns = {cfg.column: pa.array(hashes, pa.uint64())}
        if cfg.flip:
            columns[flip_column(cfg.column)] = pa.array(flipped, pa.uint64())
        columns[schema.DROP_REASON] = pa.array(reasons, pa.string())
        columns[schema.DROP_DETAILS] = pa.array(details, pa.string())
        return pa.table(columns)


STAGE = PhashStage
