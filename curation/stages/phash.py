"""Perceptual hash of every image (imagehash pHash by default; dHash or wHash selectable).

64-bit hashes (imagehash ``hash_size=8``) stored as a uint64 column whose bit order is the hex
string imagehash prints, so values can be compared with other imagehash-based tools.
With ``flip`` (default) the hash of the mirrored image is stored too: mirrored copies are
common on the web and a global perceptual hash is not flip-invariant. Near-duplicates are found
later by the global ``phash_dedup`` stage.
"""

from __future__ import annotations

import json
from typing import Literal

import imagehash
import numpy as np
import pyarrow as pa
from PIL import ImageOps
from pydantic import Field

from curation import schema
from curation.imaging import DecodeError, decode_rgb
from curation.stage import MapStage, Resources, StageConfig

HASH_FUNCTIONS = {
    "phash": imagehash.phash,
    "dhash": imagehash.dhash,
    "whash": imagehash.whash,
}
HASH_SIZE = 8  # 8 x 8 = 64 bits, one uint64


class PhashConfig(StageConfig):
    kind: Literal["phash"] = "phash"
    method: Literal["phash", "dhash", "whash"] = Field("phash", description="imagehash function")
    column: str = Field("phash", description="uint64 output column")
    flip: bool = Field(True, description="also hash the mirrored image into `<column>_flip`, so phash_dedup catches flipped copies")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="actor-pool size; 0 = one per CPU")


def flip_column(column: str) -> str:
    return f"{column}_flip"


def image_hash(image, method: str = "phash") -> int:
    """64-bit perceptual hash of a PIL image as an unsigned integer."""
    bits = HASH_FUNCTIONS[method](image, hash_size=HASH_SIZE).hash.reshape(-1)
    return int.from_bytes(np.packbits(bits).tobytes(), "big")


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
                img = decode_rgb(data or b"")
            except DecodeError as e:  # normally caught by `decode` already; keep the ledger honest
                hashes.append(None)
                flipped.append(None)
                reasons.append(e.reason)
                details.append(json.dumps({"error": str(e)[:300], "stage": self.name}))
                continue
            hashes.append(image_hash(img, cfg.method))
            flipped.append(image_hash(ImageOps.mirror(img), cfg.method) if cfg.flip else None)
            reasons.append(None)
            details.append(None)
        columns = {cfg.column: pa.array(hashes, pa.uint64())}
        if cfg.flip:
            columns[flip_column(cfg.column)] = pa.array(flipped, pa.uint64())
        columns[schema.DROP_REASON] = pa.array(reasons, pa.string())
        columns[schema.DROP_DETAILS] = pa.array(details, pa.string())
        return pa.table(columns)


STAGE = PhashStage
