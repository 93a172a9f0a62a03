"""Local features of an image (RootSIFT or ORB keypoints) and their compact column.

Why local features: a global descriptor or a perceptual hash summarises the whole frame, so a
crop, a border, a screenshot or an overlay changes it completely; the keypoints inside the copied
region survive, and a geometric fit between two images' keypoints (``geometry.py``) tells a copy
from a look-alike.

One image is one struct row of the column (``FEATURES_TYPE``), keypoints sorted by detector
response (strongest first, so a reader may keep only the first n):

* ``width``, ``height``: the size of the downscaled image the keypoints were found on;
* ``xy``: n x 2 uint16, coordinates in 1/8 pixel of that image;
* ``desc``: n x 128 uint8 (RootSIFT: sqrt of the L1-normalised SIFT vector, times 512) or
  n x 32 bytes (ORB's 256 binary tests).

Bytes per image: n x (4 + 128) for RootSIFT (33.8 kB at 256 keypoints), n x (4 + 32) for ORB,
plus the 96 x 96 grey thumbnail (9.2 kB) and ~20 bytes of struct overhead (43 kB per image at
the defaults), before Parquet's compression.

Mirrored copies: the RootSIFT descriptor of a horizontally mirrored patch is the descriptor with
its 4 x 4 spatial rows reversed and its 8 orientation bins negated (the keypoint's frame reflects
about its orientation axis), so mirrored descriptors are derived at search time and cost no
storage (``mirrored``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
import pyarrow as pa

Method = Literal["rootsift", "orb"]
XY_SCALE = 8.0  # coordinates stored in 1/8 pixel
THUMB = 96  # side of the grey thumbnail kept for the pixel check of a verified pair: at 48 px two
# different dollar bills (one print design) agreed as well as a copy (benchmarks/dedup_quality.py)
MAX_SIDE_LIMIT = 8191  # 8191.875 * 8 fits uint16
SIFT_DIM, ORB_BYTES = 128, 32
ROOTSIFT_SCALE = 512.0  # RootSIFT components stay below ~0.31 on real photos; 255/512 = 0.498

FEATURES_TYPE = pa.struct(
    [
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("xy", pa.binary()),
        pa.field("desc", pa.binary()),
        pa.field("thumb", pa.binary()),
    ]
)


@dataclass
class Features:
    """Keypoints of one image: ``xy`` float32 [n, 2] pixels, ``desc`` uint8 [n, 128 | 32],
    ``thumb`` uint8 [THUMB, THUMB] grey pixels of the whole image (squeezed to a square)."""

    width: int
    height: int
    xy: np.ndarray
    desc: np.ndarray
    thumb: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.xy)

    @property
    def binary(self) -> bool:
        """ORB (Hamming) rather than RootSIFT (L2) descriptors."""
        return self.desc.shape[1] == ORB_BYTES

    def head(self, n: int) -> "Features":
        return Features(self.width, self.height, self.xy[:n], self.desc[:n], self.thumb)

    def mirrored(self) -> "Features":
        """The features of the horizontally mirrored image (RootSIFT only)."""
        if self.binary:
            raise ValueError("ORB descriptors cannot be mirrored by permutation; use rootsift")
        xy = self.xy.copy()
        xy[:, 0] = (self.width - 1) - xy[:, 0]
        thumb = None if self.thumb is None else np.ascontiguousarray(self.thumb[:, ::-1])
        return Features(self.width, self.height, xy, self.desc[:, MIRROR_PERMUTATION], thumb)

    def vectors(self) -> np.ndarray:
        """float32 [n, d] unit vectors whose inner products rank matches as the descriptor
        distance does: RootSIFT as is (L2 on unit vectors), ORB bits as +-1 (Hamming)."""
        if self.binary:
            bits = np.unpackbits(self.desc, axis=1).astype(np.float32)
            return (bits * 2 - 1) / np.sqrt(bits.shape[1])
        x = self.desc.astype(np.float32)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _mirror_permutation() -> np.ndarray:
    """Index map of a 128-d SIFT descriptor (4 x 4 cells, row-major, 8 orientation bins each)
    to its mirror: rows reversed, bin o -> -o mod 8 (checked against OpenCV on real photos)."""
    idx = np.arange(SIFT_DIM).reshape(4, 4, 8)
    out = idx[::-1][:, :, (-np.arange(8)) % 8]
    return out.reshape(-1)


MIRROR_PERMUTATION = _mirror_permutation()


class Extractor:
    """Keypoints and descriptors of a greyscale image, at most ``max_keypoints`` of them."""

    def __init__(self, method: Method = "rootsift", max_keypoints: int = 256):
        self.method = method
        self.max_keypoints = max_keypoints
        if method == "rootsift":
            self._detector = cv2.SIFT_create(nfeatures=max_keypoints)
        elif method == "orb":
            self._detector = cv2.ORB_create(nfeatures=max_keypoints)
        else:
            raise ValueError(f"unknown local-feature method {method!r}")

    def __call__(self, gray: np.ndarray) -> Features:
        h, w = gray.shape
        kps, desc = self._detector.detectAndCompute(gray, None)
        dim = SIFT_DIM if self.method == "rootsift" else ORB_BYTES
        thumb = cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
        if desc is None or not kps:
            return Features(w, h, np.zeros((0, 2), np.float32), np.zeros((0, dim), np.uint8), thumb)
        response = np.array([k.response for k in kps], np.float32)
        xy = np.array([k.pt for k in kps], np.float32)
        order = np.lexsort((xy[:, 1], xy[:, 0], -response))[: self.max_keypoints]
        xy, desc = xy[order], desc[order]
        if self.method == "rootsift":
            root = np.sqrt(desc / np.maximum(desc.sum(axis=1, keepdims=True), 1e-7))
            desc = np.clip(np.rint(root * ROOTSIFT_SCALE), 0, 255).astype(np.uint8)
        return Features(w, h, xy, np.ascontiguousarray(desc, np.uint8), thumb)


def to_row(f: Features) -> dict:
    xy = np.clip(np.rint(f.xy * XY_SCALE), 0, 65535).astype("<u2")
    thumb = b"" if f.thumb is None else np.ascontiguousarray(f.thumb, np.uint8).tobytes()
    return {"width": int(f.width), "height": int(f.height), "xy": xy.tobytes(), "desc": np.ascontiguousarray(f.desc).tobytes(), "thumb": thumb}


def from_row(row: dict | None) -> Features | None:
    """A struct row of the column back to ``Features`` (None stays None)."""
    if row is None:
        return None
    xy = np.frombuffer(row["xy"], "<u2").reshape(-1, 2).astype(np.float32) / XY_SCALE
    n = len(xy)
    desc = np.frombuffer(row["desc"], np.uint8)
    raw = np.frombuffer(row["thumb"], np.uint8) if row.get("thumb") else None
    thumb = raw.reshape(math.isqrt(len(raw)), -1) if raw is not None else None  # any stored side (48 px before)
    return Features(int(row["width"]), int(row["height"]), xy, desc.reshape(n, -1) if n else desc.reshape(0, SIFT_DIM), thumb)


def column_features(column: pa.ChunkedArray | pa.Array) -> list[Features | None]:
    return [from_row(r) for r in column.to_pylist()]


def row_bytes(f: Features) -> int:
    """Stored bytes of one image's features (the binary fields plus the two sizes)."""
    return int(f.xy.size * 2 + f.desc.nbytes + (0 if f.thumb is None else f.thumb.nbytes) + 8)
