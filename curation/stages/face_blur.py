"""Blur identifiable faces (the paper blurs faces in the whole crawl before curation).

MTCNN finds faces; each box, enlarged by a margin, is blurred and the image is re-encoded, and
the new bytes replace the old ones in the output. Images without a face keep their original
bytes exactly, so this stage changes nothing it does not have to. Boxes are recorded in the
pixel coordinates of the stored image with EXIF orientation applied (what ``decode_rgb``
returns and what a blurred image is re-encoded as).

Detection runs at full resolution by default, so that the stage's answer is that of a
full-resolution MTCNN for every face of at least ``min_face_size`` pixels; blurred images are
checked again, as emitted, until no face is left (``max_rounds``). With ``detect_max_side``, a
JPEG is decoded no larger than its detection copy and decoded in full only when it has a face.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from curation import schema
from curation.imaging import DecodeError, decode_rgb, decode_with_info, sniff_format
from curation.safety.blur import blur_region, encode_like_source, enlarge_box, icc_profile_of
from curation.devices import torch_device_name, wants_gpu
from curation.stage import MapStage, Resources
from curation.stages._images import ImageStageConfig, error_details

FACES, FACE_BOXES, FACE_PROBS = "faces", "face_boxes", "face_probs"


class Config(ImageStageConfig):
    kind: Literal["face_blur"] = "face_blur"
    prob_threshold: float = Field(0.9, gt=0, le=1, description="MTCNN face probability at or above which a face is blurred")
    min_face_size: int = Field(20, ge=1, description="smallest face side to look for, in pixels of the stored image")
    detect_max_side: int | None = Field(
        None, ge=64,
        description="detect on a copy whose longest side is at most this, which bounds the cost on very large photos but misses "
        "faces smaller than min_face_size x (longest side / detect_max_side); null: full resolution, every face >= min_face_size",
    )
    margin: float = Field(0.2, ge=0, le=2, description="each box grows by this fraction of its width/height on every side")
    method: Literal["gaussian", "pixelate"] = "gaussian"
    gaussian_radius: float = Field(0.15, gt=0, description="Gaussian radius as a fraction of the blurred region's longer side")
    pixel_blocks: int = Field(8, ge=1, le=64, description="pixelation: blocks across the blurred region's longer side")
    batch_size: int = Field(32, ge=1, description="images handed to one process() call")
    max_rounds: int = Field(
        3, ge=1, le=10,
        description="detect-and-blur rounds: once the strongest faces are blurred MTCNN can find faces it "
        "missed, so blurred images are checked again; an image with a face left after the last round is dropped (faces_remain)",
    )

    def model_needs(self) -> list:
        from curation.models import bundled_need

        return [bundled_need(self.stage_name, "facenet_pytorch", "MTCNN face detector", ("data/pnet.pt", "data/rnet.pt", "data/onet.pt"))]


class FaceBlurStage(MapStage):
    kind = "face_blur"
    Config = Config
    roles = (schema.POOL, schema.SEED)

    def input_columns(self) -> tuple[str, ...]:
        return (schema.ROLE, schema.BYTES)

    def output_schema(self) -> pa.Schema:
        return pa.schema(
            [
                pa.field(schema.BYTES, pa.binary()),
                pa.field(schema.FORMAT, pa.string()),
                pa.field(FACES, pa.int32()),
                pa.field(FACE_BOXES, pa.list_(pa.list_(pa.float32()))),
                pa.field(FACE_PROBS, pa.list_(pa.float32())),
            ]
        )

    def resources(self) -> Resources:
        gpu = wants_gpu(self.context.cluster_gpus)
        workers = max(1, self.context.cluster_gpus if gpu else self.context.cluster_cpus)
        return Resources(num_cpus=1.0, num_gpus=1.0 if gpu else 0.0, concurrency=(1, workers), batch_size=self.config.batch_size)

    def manifest_section(self) -> dict[str, Any]:
        c = self.config
        return {
            "applied": True,
            "detector": "facenet-pytorch MTCNN",
            "prob_threshold": c.prob_threshold,
            "min_face_size": c.min_face_size,
            "detect_max_side": c.detect_max_side,
            "margin": c.margin,
            "method": c.method,
            "strength": c.gaussian_radius if c.method == "gaussian" else c.pixel_blocks,
        }

    def setup(self) -> None:
        from curation.safety.faces import FaceDetector

        c = self.config
        self._detector = FaceDetector(c.prob_threshold, c.min_face_size, c.detect_max_side, torch_device_name())

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        data = batch.column(schema.BYTES).to_pylist()
        roles = batch.column(schema.ROLE).to_pylist() if schema.ROLE in batch.column_names else [schema.POOL] * n
        out_bytes = list(data)
        formats = [sniff_format(d) if d else None for d in data]
        faces: list[int | None] = [None] * n
        boxes: list[list | None] = [None] * n
        probs: list[list | None] = [None] * n
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n

        images = {}
        for i in range(n):
            if roles[i] not in self.roles:
                continue
            try:
                images[i] = self._detection_image(data[i])
            except DecodeError as e:
                reasons[i], details[i] = e.reason, error_details(e)
        pending = {}
        for i, f in zip(images, self._detect(images.values())):
            faces[i], boxes[i], probs[i] = len(f), f.boxes.tolist(), f.probs.tolist()
            if len(f):
                pending[i] = f
        # Blur, then look again at exactly what will be emitted: removing the strongest faces can
        # reveal faces the cascade suppressed. Images without faces are not re-checked: the same
        # detector on the same bytes finds the same nothing.
        full = {i: self._full_image(data[i], *images[i]) for i in pending}
        for round_ in range(self.config.max_rounds):
            for i, f in pending.items():
                out_bytes[i], formats[i] = self._blur(full[i], f.boxes, data[i], formats[i])
            emitted = {i: self._detection_image(out_bytes[i]) for i in pending}
            pending = {i: f for i, f in zip(emitted, self._detect(emitted.values())) if len(f)}
            for i, f in pending.items():
                faces[i] += len(f)
                boxes[i] += f.boxes.tolist()
                probs[i] += f.probs.tolist()
            if not pending:
                break
        for i in pending:
            reasons[i] = "faces_remain"
            details[i] = json.dumps({"rounds": self.config.max_rounds, "boxes": pending[i].boxes.tolist()})

        return pa.table(
            {
                schema.BYTES: pa.array(out_bytes, pa.binary()),
                schema.FORMAT: pa.array(formats, pa.string()),
                FACES: pa.array(faces, pa.int32()),
                FACE_BOXES: pa.array(boxes, pa.list_(pa.list_(pa.float32()))),
                FACE_PROBS: pa.array(probs, pa.list_(pa.float32())),
                schema.DROP_REASON: pa.array(reasons, pa.string()),
                schema.DROP_DETAILS: pa.array(details, pa.string()),
            }
        )

    def _detection_image(self, data: bytes) -> tuple[Any, tuple[int, int]]:
        """The image to detect on and its full upright size: the image itself at full
        resolution, or with ``detect_max_side`` a JPEG decoded no larger than its copy."""
        detector = self._detector
        min_size = (lambda w, h: detector.copy_size((w, h))) if detector.detect_max_side else None
        img, info = decode_with_info(data, **self.config.decode_limits, min_size=min_size)
        return img, (info.width, info.height)

    def _detect(self, images) -> list:
        images = list(images)
        if not images:
            return []
        return self._detector.detect([img for img, _ in images], [size for _, size in images])

    def _full_image(self, data: bytes, img, size: tuple[int, int]):
        return img if img.size == size else decode_rgb(data, **self.config.decode_limits)

    def _blur(self, img, face_boxes, original: bytes, source_format: str | None) -> tuple[bytes, str]:
        c = self.config
        strength = c.gaussian_radius if c.method == "gaussian" else c.pixel_blocks
        for box in face_boxes:
            blur_region(img, enlarge_box(box, c.margin, img.size), c.method, strength)
        return encode_like_source(img, source_format, icc_profile_of(original))


STAGE = FaceBlurStage
