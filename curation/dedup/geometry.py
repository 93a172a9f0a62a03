"""Geometric verification of a candidate copy pair: match keypoints, fit a transform, count inliers.

Two unrelated photos share some look-alike keypoints (sky, text, foliage), but their matches
scatter; a copy's matches agree on one transform of the plane (a crop and rescale is a
similarity, a rotation too, a padded or screenshotted copy a scale and a shift). RANSAC finds
that transform and the matches that agree with it; a pair is a copy when enough of them do
(``min_inliers``), when they are a large enough share of the tentative matches
(``min_inlier_ratio``) and when they spread over a real part of one of the images
(``min_coverage``: an overlaid emoji or logo matched between two unrelated photos covers a few
percent). The transform must be one a copy can have: positive determinant (a mirror is handled
by matching the mirrored features), scale within ``max_scale`` either way, anisotropy (ratio of
singular values) at most ``max_anisotropy``. Last, the pixels must agree where the transform
says the images overlap (``min_agreement``, on small thumbnails): two different T-shirts
photographed on the same bedspread, or two clip-art signs in one font, match keypoints on a
consistent transform, but their fine detail disagrees over most of the overlap. Optionally
(``agreement_trim``) the overlap is scored in cells and its worst share is left out: an overlay
(emoji, text, a logo) disagrees where it covers, and its hard edges outweigh a low-texture
photo's detail everywhere else; but pages of one app showing unrelated photos then agree on
their shared frame more often, so the default scores the whole overlap.

Deterministic: OpenCV's RANSAC seeds its own generator on every call, so the same two images
give the same verdict in every task and form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from curation.dedup.local_features import Features

Model = Literal["similarity", "affine", "homography"]


class VerifySettings(BaseModel):
    """How two images' keypoints must agree for the pair to count as a copy."""

    model_config = ConfigDict(extra="forbid")

    model: Model = Field("affine", description="transform fitted by RANSAC: similarity (4 dof), affine (6) or homography (8)")
    ratio: float = Field(0.85, gt=0, le=1, description="Lowe's ratio test for tentative matches (nearest / second nearest distance)")
    reprojection_px: float = Field(6.0, gt=0, description="RANSAC inlier threshold, pixels of the downscaled feature image")
    min_inliers: int = Field(12, ge=4, description="inlier matches needed")
    min_inlier_ratio: float = Field(0.6, ge=0, le=1, description="inliers / tentative matches needed")
    min_coverage: float = Field(0.2, ge=0, le=1, description="area share of the inliers' bounding box, in the image where it is larger")
    min_agreement: float = Field(0.6, ge=-1, le=1, description="correlation of the two thumbnails' fine detail over the overlap (pixel_agreement)")
    agreement_trim: float = Field(0.0, ge=0, lt=1, description="share of the overlap's cells (1/8 of the thumbnail a side) with the lowest agreement left out: overlays pass, but so do more pages sharing an app frame")
    max_scale: float = Field(8.0, ge=1, description="largest scale change (either way) a copy may have")
    max_anisotropy: float = Field(2.0, ge=1, description="largest ratio of the transform's singular values")


@dataclass
class Verdict:
    """The outcome of verifying one ordered pair (a -> b)."""

    ok: bool
    inliers: int = 0
    matches: int = 0
    coverage: float = 0.0
    mirrored: bool = False
    matrix: np.ndarray | None = None  # 2x3 (or 3x3 for a homography): a's pixels -> b's
    reason: str = "too_few_matches"
    agreement: float | None = None  # pixel_agreement, computed once the geometry passed
    source_box: tuple | None = None  # (x0, y0, x1, y1): the inliers' bounding box in a's own (unmirrored) frame
    target_box: tuple | None = None  # the same in b's frame
    source_points: np.ndarray | None = None  # the inliers in a's own (unmirrored) frame, float32 [k, 2]

    @property
    def inlier_ratio(self) -> float:
        return self.inliers / self.matches if self.matches else 0.0

    def transform(self, model: str) -> dict:
        """The transform, for the ledger: type, the matrix, scale, rotation, mirrored."""
        if self.matrix is None:
            return {"type": model, "mirrored": self.mirrored}
        lin = self.matrix[:2, :2]
        scale, rotation = math.sqrt(abs(np.linalg.det(lin))), math.degrees(math.atan2(lin[1, 0], lin[0, 0]))
        return {
            "type": model,
            "matrix": [[round(float(v), 4) for v in row] for row in self.matrix],
            "scale": round(scale, 4),
            "rotation_deg": round(rotation, 2),
            "mirrored": self.mirrored,
        }

    def details(self, model: str) -> dict:
        return {
            "inliers": int(self.inliers),
            "matches": int(self.matches),
            "inlier_ratio": round(self.inlier_ratio, 4),
            "coverage": round(float(self.coverage), 4),
            "pixel_agreement": None if self.agreement is None else round(float(self.agreement), 4),
            "transform": self.transform(model),
            "verified": bool(self.ok),
            **({} if self.ok else {"rejected": self.reason}),
        }


def tentative_matches(a: Features, b: Features, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """(index in a, index in b) of a's keypoints whose nearest descriptor in b passes the ratio
    test and is mutual (a's nearest in b has a as its nearest in a)."""
    if len(a) < 2 or len(b) < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    if a.binary:
        norm, da, db = cv2.NORM_HAMMING, a.desc, b.desc
    else:
        norm, da, db = cv2.NORM_L2, a.vectors(), b.vectors()
    matcher = cv2.BFMatcher(norm)
    ab = matcher.knnMatch(da, db, k=2)
    ba = matcher.match(db, da)
    back = np.full(len(b), -1, np.int64)
    for m in ba:
        back[m.queryIdx] = m.trainIdx
    ia, ib = [], []
    for pair in ab:
        if len(pair) < 2:
            continue
        m, second = pair
        if m.distance <= ratio * second.distance and back[m.trainIdx] == m.queryIdx:
            ia.append(m.queryIdx)
            ib.append(m.trainIdx)
    return np.asarray(ia, np.int64), np.asarray(ib, np.int64)


def _fit(src: np.ndarray, dst: np.ndarray, s: VerifySettings):
    if s.model == "homography":
        m, mask = cv2.findHomography(src, dst, cv2.RANSAC, s.reprojection_px, maxIters=2000, confidence=0.995)
    elif s.model == "similarity":
        m, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=s.reprojection_px, maxIters=2000, confidence=0.995)
    else:
        m, mask = cv2.estimateAffine2D(src, dst, method=cv2.RANSAC, ransacReprojThreshold=s.reprojection_px, maxIters=2000, confidence=0.995)
    return m, (mask.reshape(-1).astype(bool) if mask is not None else np.zeros(len(src), bool))


def _plausible(m: np.ndarray, s: VerifySettings) -> str | None:
    lin = m[:2, :2] / (m[2, 2] if m.shape[0] == 3 and m[2, 2] else 1.0)
    if np.linalg.det(lin) <= 0:
        return "reflected_or_degenerate"
    sv = np.linalg.svd(lin, compute_uv=False)
    scale = math.sqrt(sv[0] * sv[1])
    if not (1 / s.max_scale <= scale <= s.max_scale):
        return "implausible_scale"
    if sv[0] / max(sv[1], 1e-12) > s.max_anisotropy:
        return "implausible_shear"
    return None


def _box(xy: np.ndarray) -> tuple | None:
    """(x0, y0, x1, y1): the bounding box of the points, None for none."""
    if len(xy) == 0:
        return None
    lo, hi = xy.min(axis=0), xy.max(axis=0)
    return (float(lo[0]), float(lo[1]), float(hi[0]), float(hi[1]))


def _coverage(box: tuple | None, width: int, height: int) -> float:
    """The area share of ``box`` in a width x height image."""
    if box is None:
        return 0.0
    return (box[2] - box[0]) * (box[3] - box[1]) / max(1.0, float(width * height))


def homogeneous(m: np.ndarray) -> np.ndarray:
    """A 2x3 affine as 3x3 (a 3x3 homography as it is)."""
    return m if m.shape[0] == 3 else np.vstack([m, [0.0, 0.0, 1.0]])


def box_inside_share(box: tuple | None, frame: tuple | None) -> float:
    """The share of ``box``'s area that lies inside ``frame`` (both (x0, y0, x1, y1))."""
    if box is None or frame is None:
        return 0.0
    w = max(0.0, min(box[2], frame[2]) - max(box[0], frame[0]))
    h = max(0.0, min(box[3], frame[3]) - max(box[1], frame[1]))
    area = max(1e-9, (box[2] - box[0]) * (box[3] - box[1]))
    return w * h / area


def inlier_support(box: tuple | None, verdict: "Verdict") -> float:
    """How densely ``verdict``'s inliers (in its source image) fill ``box``, against their density
    over their own bounding box: about 1 when ``box`` is a part of the matched region, 0 when the
    matches lie elsewhere (an app frame around the photo ``box`` holds)."""
    if box is None or verdict.source_points is None or verdict.source_box is None or not len(verdict.source_points):
        return 0.0
    p = verdict.source_points
    inside = int(((p[:, 0] >= box[0]) & (p[:, 0] <= box[2]) & (p[:, 1] >= box[1]) & (p[:, 1] <= box[3])).sum())
    expected = len(p) * box_inside_share(verdict.source_box, box)  # inliers there if spread evenly
    return inside / max(1.0, expected)


def pixel_agreement(a: Features, b: Features, m: np.ndarray, trim: float = 0.0) -> float:
    """Correlation of the two thumbnails' fine detail (each minus its local mean) over their
    overlap under ``m`` (a's pixels -> b's), in the frame of either image (the better of the
    two). A copy agrees across its whole overlap, an overlay aside; two photos that share only a
    background pattern, a logo, a font or an app's frame agree there and nowhere else."""
    if a.thumb is None or b.thumb is None:
        return 1.0
    to_thumb = lambda f: np.diag([f.thumb.shape[1] / f.width, f.thumb.shape[0] / f.height, 1.0])  # noqa: E731  (each its own side)
    mt = to_thumb(b) @ homogeneous(m) @ np.linalg.inv(to_thumb(a))
    return max(_detail_correlation(a.thumb, b.thumb, mt, trim), _detail_correlation(b.thumb, a.thumb, np.linalg.inv(mt), trim))


DETAIL_BOX = 5  # pixels of the thumbnail: the local mean removed before correlating


def _detail(img: np.ndarray) -> np.ndarray:
    f = img.astype(np.float32)
    return f - cv2.blur(f, (DETAIL_BOX, DETAIL_BOX))


def _detail_correlation(src: np.ndarray, dst: np.ndarray, m: np.ndarray, trim: float = 0.0) -> float:
    """Correlation of the detail of ``src`` warped by ``m`` onto ``dst``, over the overlap, less
    the ``trim`` share of AGREEMENT_CELLS x AGREEMENT_CELLS cells that agree worst."""
    size = (dst.shape[1], dst.shape[0])
    warped = cv2.warpPerspective(src.astype(np.float32), m, size, flags=cv2.INTER_LINEAR)
    mask = cv2.warpPerspective(np.ones_like(src, np.uint8), m, size, flags=cv2.INTER_NEAREST)
    mask = cv2.erode(mask, np.ones((DETAIL_BOX + 2, DETAIL_BOX + 2), np.uint8)).astype(np.float32)
    if mask.sum() < 16:
        return 0.0
    x, y = _detail(warped) * mask, _detail(dst) * mask
    xy, xx, yy = x * y, x * x, y * y
    if trim > 0:
        cell = max(1, min(dst.shape) // AGREEMENT_CELLS)
        covered = _cell_sums(mask, cell) >= cell * cell / 2
        xy, xx, yy = (_cell_sums(v, cell)[covered] for v in (xy, xx, yy))
        if len(xy):
            worst_first = np.argsort(xy / np.sqrt(xx * yy + 1e-6), kind="stable")
            kept = worst_first[int(trim * len(xy)):]
            xy, xx, yy = xy[kept], xx[kept], yy[kept]
    denom = float(np.sqrt(xx.sum() * yy.sum()))
    return float(xy.sum() / denom) if denom > 1e-6 else 0.0


AGREEMENT_CELLS = 8  # cells a side of the thumbnail for agreement_trim (12 px cells at 96 px)


def _cell_sums(v: np.ndarray, cell: int) -> np.ndarray:
    """Sums over cell x cell blocks (the ragged edge left out), flattened."""
    h, w = (v.shape[0] // cell) * cell, (v.shape[1] // cell) * cell
    return v[:h, :w].reshape(h // cell, cell, w // cell, cell).sum(axis=(1, 3)).ravel()


def verify_once(a: Features, b: Features, s: VerifySettings, mirrored: bool = False) -> Verdict:
    ia, ib = tentative_matches(a, b, s.ratio)
    n = len(ia)
    if n < s.min_inliers:
        return Verdict(False, 0, n, mirrored=mirrored, reason="too_few_matches")
    src, dst = a.xy[ia].astype(np.float32), b.xy[ib].astype(np.float32)
    m, inl = _fit(src, dst, s)
    if m is None:
        return Verdict(False, 0, n, mirrored=mirrored, reason="no_transform")
    k = int(inl.sum())
    source_box, target_box = _box(src[inl]), _box(dst[inl])
    coverage = max(_coverage(source_box, a.width, a.height), _coverage(target_box, b.width, b.height))
    points = src[inl].copy()
    if mirrored and source_box is not None:  # back to a's own frame (Features.mirrored flips x)
        source_box = ((a.width - 1) - source_box[2], source_box[1], (a.width - 1) - source_box[0], source_box[3])
        points[:, 0] = (a.width - 1) - points[:, 0]
    verdict = Verdict(False, k, n, coverage, mirrored, np.asarray(m, np.float64), source_box=source_box, target_box=target_box,
                      source_points=points)
    problem = _plausible(verdict.matrix, s)
    if problem is None and k < s.min_inliers:
        problem = "too_few_inliers"
    if problem is None and verdict.inlier_ratio < s.min_inlier_ratio:
        problem = "low_inlier_ratio"
    if problem is None and coverage < s.min_coverage:
        problem = "low_coverage"
    if problem is None:
        verdict.agreement = pixel_agreement(a, b, verdict.matrix, s.agreement_trim)
        if verdict.agreement < s.min_agreement:
            problem = "pixels_disagree"
    verdict.ok, verdict.reason = problem is None, problem or ""
    return verdict


def verify_pair(a: Features | None, b: Features | None, s: VerifySettings, mirror: bool = False) -> Verdict:
    """Is ``a`` a copy of ``b``? Direct first; with ``mirror``, the mirrored ``a`` as well (the
    better verdict wins: a passing one, then more inliers). ORB features are never mirrored."""
    if a is None or b is None:
        return Verdict(False, reason="no_features")
    best = verify_once(a, b, s)
    if best.ok or not mirror or a.binary:
        return best
    flipped = verify_once(a.mirrored(), b, s, mirrored=True)
    return flipped if flipped.ok or flipped.inliers > best.inliers else best
