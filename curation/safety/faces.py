"""Face detection with facenet-pytorch's MTCNN (its weights ship inside the wheel).

Large images are detected on a copy whose longest side is at most ``detect_max_side`` and the
boxes are scaled back, because MTCNN's image pyramid grows with the image and a face that fills
a 4000-px photo is found just as well at 1024 px. Images of equal detection size are batched
into one MTCNN call (MTCNN only batches equal-size images).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
from PIL import Image

# MTCNN's first network looks at 12x12 windows: a face smaller than that on the detection copy
# cannot be found, and asking for less makes MTCNN upsample the whole image.
PNET_WINDOW = 12


@dataclass(frozen=True)
class Faces:
    """Faces found in one image, in that image's pixel coordinates (x1, y1, x2, y2)."""

    boxes: np.ndarray  # (n, 4) float32
    probs: np.ndarray  # (n,) float32

    def __len__(self) -> int:
        return len(self.probs)

    @staticmethod
    def none() -> "Faces":
        return Faces(np.zeros((0, 4), np.float32), np.zeros((0,), np.float32))


def detection_scale(size: tuple[int, int], max_side: int | None) -> float:
    """Factor from the image to its detection copy (never above 1: no upsampling)."""
    if max_side is None:
        return 1.0
    return min(1.0, max_side / max(size))


class FaceDetector:
    """MTCNN with a probability threshold, a minimum face size and downscaled detection."""

    def __init__(
        self,
        prob_threshold: float = 0.9,
        min_face_size: int = 20,
        detect_max_side: int | None = 1024,
        device: str = "cpu",
    ):
        import torch
        from facenet_pytorch import MTCNN

        self.prob_threshold = prob_threshold
        self.min_face_size = min_face_size
        self.detect_max_side = detect_max_side
        self.mtcnn = MTCNN(keep_all=True, select_largest=False, post_process=False, device=torch.device(device))

    def detect(self, images: list[Image.Image]) -> list[Faces]:
        """Faces of every RGB image, batched by detection size and pyramid.

        Images share a MTCNN call only when both their detection size and their minimum face
        size (in detector pixels) agree, so an image's result never depends on which other
        images were in its batch: the stage re-checks its output with the same detector and
        must get the same answer as any later check."""
        results: list[Faces] = [Faces.none()] * len(images)
        groups: dict[tuple[tuple[int, int], float], list[int]] = defaultdict(list)
        copies: dict[int, Image.Image] = {}
        scales: dict[int, tuple[float, float]] = {}
        for i, img in enumerate(images):
            scale = detection_scale(img.size, self.detect_max_side)
            if scale < 1.0:
                size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
                copies[i] = img.resize(size, Image.BILINEAR)
            else:
                copies[i] = img
            size = copies[i].size
            scales[i] = (size[0] / img.width, size[1] / img.height)
            # The minimum face size is given in stored-image pixels; the detector sees it scaled.
            min_size = round(max(float(PNET_WINDOW), self.min_face_size * min(scales[i])), 3)
            groups[(size, min_size)].append(i)
        for (size, min_size), idx in groups.items():
            if min(size) < min_size:
                continue  # no face of the minimum size fits: MTCNN would build an empty pyramid
            self.mtcnn.min_face_size = min_size
            batch_boxes, batch_probs = self.mtcnn.detect([copies[i] for i in idx])
            for i, boxes, probs in zip(idx, batch_boxes, batch_probs):
                results[i] = self._keep(boxes, probs, images[i].size, scales[i])
        return results

    def _keep(self, boxes, probs, size: tuple[int, int], scale: tuple[float, float]) -> Faces:
        if boxes is None:
            return Faces.none()
        # facenet-pytorch returns object arrays under numpy 2.
        boxes = np.asarray(boxes).astype(np.float64).reshape(-1, 4) / np.array([*scale, *scale])
        probs = np.asarray(probs).astype(np.float64).reshape(-1)
        w, h = size
        boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, w)
        boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, h)
        # MTCNN's minimum size only sets where its pyramid starts; refined boxes can come out
        # smaller, so the minimum is enforced here (on the longer side, to err towards blurring).
        longer = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
        keep = (probs >= self.prob_threshold) & (longer >= self.min_face_size)
        boxes, probs = boxes[keep], probs[keep]
        return Faces(boxes.astype(np.float32), probs.astype(np.float32))
