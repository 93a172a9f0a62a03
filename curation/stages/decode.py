"""Decode and validate every image once.

Drops what a trainer cannot use (corrupt, truncated, decompression bombs, headers that claim more
pixels than the file can hold, images above the decoded-memory cap, too small, extreme aspect
ratio) and normalises the rest so that every emitted image decodes to upright RGB with
any reader: images with EXIF rotation, CMYK, 16-bit, palette, alpha or several frames are
re-encoded (PNG for lossless sources, JPEG q95 for lossy ones); the others keep their bytes.
"""

from __future__ import annotations

import json
from typing import Literal

import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.imaging import DecodeError, decode_with_info, encode
from curation.stage import MapStage, Resources
from curation.stages._images import ImageStageConfig, error_details

_LOSSY = {"JPEG", "WEBP", "MPO"}
_PASSTHROUGH_FORMATS = {"JPEG", "PNG", "WEBP"}
_PASSTHROUGH_MODES = {"RGB", "L"}


class DecodeConfig(ImageStageConfig):
    kind: Literal["decode"] = "decode"
    min_side: int = Field(64, ge=1, description="images whose shorter side is smaller are dropped (too_small)")
    max_aspect_ratio: float = Field(6.0, ge=1.0, description="long/short side above this is dropped (extreme_aspect)")
    normalize: bool = Field(True, description="re-encode images that are not plain upright RGB/L JPEG/PNG/WebP")
    batch_size: int = Field(64, ge=1)
    workers: int = Field(0, ge=0, description="workers at once (tasks on CPU, actors on GPU); 0 = one per CPU")


class DecodeStage(MapStage):
    kind = "decode"
    Config = DecodeConfig

    def input_columns(self):
        return (schema.BYTES,)

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field(schema.BYTES, pa.binary()),  # null = unchanged
                pa.field(schema.FORMAT, pa.string()),
                pa.field(schema.WIDTH, pa.int32()),
                pa.field(schema.HEIGHT, pa.int32()),
                pa.field("mode", pa.string()),
                pa.field("normalized", pa.bool_()),
            ]
        )

    def resources(self) -> Resources:
        n = self.config.workers or max(1, self.context.cluster_cpus)
        return Resources(num_cpus=1, concurrency=(1, n), batch_size=self.config.batch_size)

    def process(self, batch: pa.Table) -> pa.Table:
        rows = [self._one(b) for b in batch.column(schema.BYTES).to_pylist()]
        names = [*self.output_schema().names, schema.DROP_REASON, schema.DROP_DETAILS]
        return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)}, schema=pa.schema(
            [*self.output_schema(), pa.field(schema.DROP_REASON, pa.string()), pa.field(schema.DROP_DETAILS, pa.string())]
        ))

    def _one(self, data: bytes | None):
        cfg = self.config
        try:
            img, info = decode_with_info(data or b"", **cfg.decode_limits)
        except DecodeError as e:
            return (None, None, None, None, None, None, e.reason, error_details(e))
        w, h = img.size
        short, long_ = min(w, h), max(w, h)
        if short < cfg.min_side:
            return (None, info.format, w, h, info.mode, False, "too_small", json.dumps({"width": w, "height": h, "min_side": cfg.min_side}))
        if long_ / short > cfg.max_aspect_ratio:
            return (None, info.format, w, h, info.mode, False, "extreme_aspect", json.dumps({"width": w, "height": h, "max_aspect_ratio": cfg.max_aspect_ratio}))
        if cfg.normalize and self._needs_normalizing(info):
            fmt = "JPEG" if info.format in _LOSSY else "PNG"
            return (encode(img, fmt), fmt, w, h, info.mode, True, None, None)
        return (None, info.format, w, h, info.mode, False, None, None)

    @staticmethod
    def _needs_normalizing(info) -> bool:
        return (
            info.format not in _PASSTHROUGH_FORMATS
            or info.mode not in _PASSTHROUGH_MODES
            or info.n_frames > 1
            or info.orientation not in (0, 1)
        )


STAGE = DecodeStage
