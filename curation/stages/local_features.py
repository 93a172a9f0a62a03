"""Local features of every image (RootSIFT by default, ORB selectable) for copy detection.

Each image is decoded once, downscaled so that its longer side is at most ``max_side`` (the
cost of the detector grows with pixels; copies are found at this size), converted to grey and
described by at most ``max_keypoints`` keypoints, strongest first. The features go into one
struct column (layout and bytes per image: ``curation.dedup.local_features``), read by
``local_copy_dedup`` and by ``copy_dedup``'s band verification.

An image with fewer than ``min_keypoints`` keypoints (a blank, a flat logo, a tiny icon) gets a
null features value and its keypoint count: it is never dropped for that, and the hash and
descriptor stages still deduplicate it.
"""

from __future__ import annotations

import json
from typing import Literal

import cv2
import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from curation import schema
from curation.dedup.local_features import FEATURES_TYPE, MAX_SIDE_LIMIT, Extractor, Features, to_row
from curation.imaging import DecodeError, decode_rgb
from curation.stage import MapStage, Resources, StageConfig

KEYPOINTS = "local_keypoints"


class LocalFeaturesConfig(StageConfig):
    kind: Literal["local_features"] = "local_features"
    method: Literal["rootsift", "orb"] = Field("rootsift", description="keypoint detector and descriptor (OpenCV)")
    max_side: int = Field(400, ge=32, le=MAX_SIDE_LIMIT, description="longer side of the downscaled copy the keypoints are found on")
    max_keypoints: int = Field(256, ge=8, le=4096, description="keypoints kept per image, strongest first")
    min_keypoints: int = Field(12, ge=1, description="fewer keypoints than this: features null (too few to verify a copy)")
    column: str = Field("local_features", description="output struct column")
    batch_size: int = Field(32, ge=1)
    workers: int = Field(0, ge=0, description="workers at once (tasks on CPU, actors on GPU); 0 = one per CPU")


def downscaled_gray(data: bytes, max_side: int) -> np.ndarray:
    """The one decode of this stage: full decode, then a downscale to ``max_side``, in grey.
    (Where a decode-at-target-size helper exists, this is the call to switch.)"""
    img = decode_rgb(data)
    scale = max_side / max(img.size)
    if scale < 1:
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0)
    return np.asarray(img.convert("L"))


class LocalFeaturesStage(MapStage):
    kind = "local_features"
    Config = LocalFeaturesConfig

    def input_columns(self):
        return (schema.BYTES,)

    def output_schema(self) -> pa.Schema:
        return pa.schema([pa.field(self.config.column, FEATURES_TYPE), pa.field(KEYPOINTS, pa.int32())])

    def resources(self) -> Resources:
        n = self.config.workers or max(1, self.context.cluster_cpus)
        return Resources(num_cpus=1, concurrency=(1, n), batch_size=self.config.batch_size)

    def setup(self) -> None:
        cv2.setNumThreads(1)  # one actor per CPU: OpenCV's own threads would oversubscribe
        self._extract = Extractor(self.config.method, self.config.max_keypoints)

    def features(self, data: bytes) -> Features:
        return self._extract(downscaled_gray(data, self.config.max_side))

    def process(self, batch: pa.Table) -> pa.Table:
        cfg = self.config
        rows, counts, reasons, details = [], [], [], []
        for data in batch.column(schema.BYTES).to_pylist():
            try:
                f = self.features(data or b"")
            except DecodeError as e:  # normally caught by `decode` already; keep the ledger honest
                rows.append(None)
                counts.append(None)
                reasons.append(e.reason)
                details.append(json.dumps({"error": str(e)[:300], "stage": self.name}))
                continue
            rows.append(to_row(f) if len(f) >= cfg.min_keypoints else None)
            counts.append(len(f))
            reasons.append(None)
            details.append(None)
        return pa.table(
            {
                cfg.column: pa.array(rows, FEATURES_TYPE),
                KEYPOINTS: pa.array(counts, pa.int32()),
                schema.DROP_REASON: pa.array(reasons, pa.string()),
                schema.DROP_DETAILS: pa.array(details, pa.string()),
            }
        )

    def manifest_section(self) -> dict:
        cfg = self.config
        per_kp = 4 + (128 if cfg.method == "rootsift" else 32)
        return {"method": cfg.method, "max_side": cfg.max_side, "max_keypoints": cfg.max_keypoints,
                "bytes_per_image_max": cfg.max_keypoints * per_kp + 8}


STAGE = LocalFeaturesStage
