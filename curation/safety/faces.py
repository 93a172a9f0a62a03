"""Face detection with facenet-pytorch's MTCNN (its weights ship inside the wheel).

By default every image is detected at its full resolution: MTCNN's pyramid starts at the scale
where a face of ``min_face_size`` pixels fills its 12-pixel window, so its cost is set by that
size, not by the image, and a downscaled copy saves nothing until it is small enough to lose the
smallest faces (a copy at 0.94x of a 702x1094 photo lost a 32x47 face at p = 0.91). With
``detect_max_side`` images are detected on a copy whose longest side is at most that, which
bounds the cost for very large photos at the price of faces below ``min_face_size`` times the
reduction. Images of equal detection size are batched into one MTCNN call (MTCNN only batches
equal-size images).

MTCNN's max-pooling layers (``ceil_mode=True``) are replaced by an exact equivalent: torch's
CPU kernel for them took as long as all of MTCNN's convolutions; the maximum of strided slices
gives the same values bit for bit in a fraction of the time.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import torch
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


class CeilMaxPool2d(torch.nn.Module):
    """``nn.MaxPool2d(kernel, stride, ceil_mode=True)`` (no padding) as the maximum of
    kernel x kernel strided slices of the input padded with -inf: the same values, exactly."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, s = self.kernel, self.stride
        h, w = x.shape[-2:]
        oh, ow = -(-(h - k) // s) + 1, -(-(w - k) // s) + 1
        ph, pw = (oh - 1) * s + k - h, (ow - 1) * s + k - w
        if ph > 0 or pw > 0:
            x = torch.nn.functional.pad(x, (0, max(pw, 0), 0, max(ph, 0)), value=float("-inf"))
        # Separable: the maximum over each window's columns, then over its rows (2(k-1) ops).
        return _strided_max(_strided_max(x, k, s, ow, dim=-1), k, s, oh, dim=-2)


def _strided_max(x: torch.Tensor, k: int, s: int, n: int, dim: int) -> torch.Tensor:
    """out[j] = max(x[j*s : j*s + k]) along ``dim``, for j < n."""
    index = [slice(None)] * x.dim()

    def window(d: int) -> torch.Tensor:
        index[dim] = slice(d, d + (n - 1) * s + 1, s)
        return x[tuple(index)]

    out = torch.maximum(window(0), window(1)) if k > 1 else window(0).clone()
    for d in range(2, k):
        torch.maximum(out, window(d), out=out)
    return out


def use_exact_fast_pooling(module: torch.nn.Module) -> None:
    """Swap every ceil-mode, unpadded ``MaxPool2d`` inside ``module`` for ``CeilMaxPool2d``."""
    for name, child in module.named_children():
        if isinstance(child, torch.nn.MaxPool2d) and child.ceil_mode and child.padding in (0, (0, 0)) and child.dilation in (1, (1, 1)):
            k = child.kernel_size if isinstance(child.kernel_size, int) else child.kernel_size[0]
            st = child.stride if isinstance(child.stride, int) else child.stride[0]
            setattr(module, name, CeilMaxPool2d(k, st))
        else:
            use_exact_fast_pooling(child)


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
        detect_max_side: int | None = None,
        device: str = "cpu",
    ):
        from facenet_pytorch import MTCNN

        self.prob_threshold = prob_threshold
        self.min_face_size = min_face_size
        self.detect_max_side = detect_max_side
        self.mtcnn = MTCNN(keep_all=True, select_largest=False, post_process=False, device=torch.device(device))
        use_exact_fast_pooling(self.mtcnn)

    def copy_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """The detection copy's size for an image of ``size`` (the size itself at full resolution)."""
        scale = detection_scale(size, self.detect_max_side)
        if scale >= 1.0:
            return size
        return (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))

    def detect(self, images: list[Image.Image], sizes: list[tuple[int, int]] | None = None) -> list[Faces]:
        """Faces of every RGB image, batched by detection size and pyramid.

        ``sizes`` are the images' full sizes when ``images`` were decoded smaller (at least
        their detection copy's size); boxes are returned in full-size pixels.

        Images share a MTCNN call only when both their detection size and their minimum face
        size (in detector pixels) agree, so an image's result never depends on which other
        images were in its batch: the stage re-checks its output with the same detector and
        must get the same answer as any later check."""
        sizes = sizes or [img.size for img in images]
        results: list[Faces] = [Faces.none()] * len(images)
        groups: dict[tuple[tuple[int, int], float], list[int]] = defaultdict(list)
        copies: dict[int, Image.Image] = {}
        scales: dict[int, tuple[float, float]] = {}
        for i, (img, full) in enumerate(zip(images, sizes)):
            size = self.copy_size(full)
            copies[i] = img if img.size == size else img.resize(size, Image.BILINEAR)
            scales[i] = (size[0] / full[0], size[1] / full[1])
            # The minimum face size is given in stored-image pixels; the detector sees it scaled.
            min_size = round(max(float(PNET_WINDOW), self.min_face_size * min(scales[i])), 3)
            groups[(size, min_size)].append(i)
        for (size, min_size), idx in groups.items():
            if min(size) < min_size:
                continue  # no face of the minimum size fits: MTCNN would build an empty pyramid
            self.mtcnn.min_face_size = min_size
            with torch.inference_mode():
                batch_boxes, batch_probs = self.mtcnn.detect([copies[i] for i in idx])
            for i, boxes, probs in zip(idx, batch_boxes, batch_probs):
                results[i] = self._keep(boxes, probs, sizes[i], scales[i])
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
