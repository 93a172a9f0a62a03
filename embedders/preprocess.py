"""What an embedder's torchvision preprocessing says about decoding: how large the decoded
image must be, and the same steps as operations on a decoded uint8 tensor (for GPU decoding).

Both are read off the transform itself (timm's eval transform, SSCD's v2 pipeline) so that a
model's preprocessing is written once.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torchvision import transforms as T1
from torchvision.transforms import v2 as T2

# Decode a JPEG no smaller than this many times the first resize's output: the resize then
# still averages >= 2x2 decoded pixels per output pixel, as Pillow's own Image.thumbnail does
# (reducing_gap=2), so the scaled decode changes the model input by rounding only.
DRAFT_GAP = 2

_RESIZES = (T1.Resize, T2.Resize)
_TENSOR_NATIVE = (T1.CenterCrop, T1.Normalize, T2.CenterCrop, T2.Normalize, T2.ToDtype, T2.ToImage)


def _steps(transform) -> list:
    return list(getattr(transform, "transforms", [transform]))


def resize_box(transform) -> tuple[int, int] | None:
    """(width, height) the image must have on both sides before the first resize of
    ``transform`` (its short-side length twice for a single-int resize), or None when the
    transform does not start with a plain resize."""
    for step in _steps(transform):
        if isinstance(step, (T1.PILToTensor, T2.PILToTensor)):
            continue
        if isinstance(step, _RESIZES):
            size = step.size
            if isinstance(size, int):
                return (size, size)
            if len(size) == 1:
                return (size[0], size[0])
            return (size[1], size[0])  # torchvision sizes are (h, w)
        return None
    return None


def decode_min_size(transform) -> tuple[int, int] | None:
    box = resize_box(transform)
    return None if box is None else (box[0] * DRAFT_GAP, box[1] * DRAFT_GAP)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0)


def tensor_pipeline(transform) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """``transform`` as a function of a uint8 CHW tensor (on any device), or None when a step
    has no tensor form. ToTensor-like steps become a division by 255, as they are on PIL input;
    resizes run on the uint8 tensor, as PIL resizes uint8 pixels."""
    ops: list[Callable] = []
    for step in _steps(transform):
        if isinstance(step, (T1.PILToTensor, T2.PILToTensor)):
            continue  # the input already is that tensor
        if isinstance(step, T1.ToTensor):  # timm's MaybeToTensor too
            ops.append(_to_float)
        elif isinstance(step, _RESIZES) and step.antialias is not False:
            ops.append(step)
        elif isinstance(step, _TENSOR_NATIVE):
            ops.append(step)
        else:
            return None

    def run(x: torch.Tensor) -> torch.Tensor:
        for op in ops:
            x = op(x)
        return x if x.is_floating_point() else _to_float(x)

    return run
