"""Making detected faces unrecognisable, and re-encoding the result.

The blurred area is the detector's box enlarged by a margin on every side (MTCNN boxes are tight
around eyes, nose and mouth; hair, ears and jaw line identify people too). Strength scales with
the box so that a large face is blurred as much, relative to its size, as a small one.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, ImageFilter

BlurMethod = Literal["gaussian", "pixelate"]


def enlarge_box(box, margin: float, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Integer pixel box grown by ``margin`` times its width/height on each side, clipped."""
    x1, y1, x2, y2 = (float(v) for v in box)
    dx, dy = (x2 - x1) * margin, (y2 - y1) * margin
    w, h = size
    return (
        max(0, int(np.floor(x1 - dx))),
        max(0, int(np.floor(y1 - dy))),
        min(w, int(np.ceil(x2 + dx))),
        min(h, int(np.ceil(y2 + dy))),
    )


def blur_region(img: Image.Image, region: tuple[int, int, int, int], method: BlurMethod, strength: float) -> None:
    """Blur ``region`` of ``img`` in place.

    gaussian: radius = ``strength`` x the region's longer side.
    pixelate: the region's longer side becomes ``strength`` blocks (a fixed block count keeps
    every face equally coarse, whatever its size).
    """
    x1, y1, x2, y2 = region
    w, h = x2 - x1, y2 - y1
    if w <= 0 or h <= 0:
        return
    if method == "gaussian":
        radius = max(1.0, strength * max(w, h))
        # Blur a padded crop so that the edge of the region is blurred with real neighbours
        # instead of the crop's replicated border.
        pad = int(np.ceil(2 * radius))
        px1, py1 = max(0, x1 - pad), max(0, y1 - pad)
        px2, py2 = min(img.width, x2 + pad), min(img.height, y2 + pad)
        blurred = img.crop((px1, py1, px2, py2)).filter(ImageFilter.GaussianBlur(radius))
        img.paste(blurred.crop((x1 - px1, y1 - py1, x2 - px1, y2 - py1)), (x1, y1))
    elif method == "pixelate":
        blocks = max(1, int(strength))
        scale = blocks / max(w, h)
        small = (max(1, round(w * scale)), max(1, round(h * scale)))
        crop = img.crop(region).resize(small, Image.BOX).resize((w, h), Image.NEAREST)
        img.paste(crop, (x1, y1))
    else:
        raise ValueError(f"unknown blur method {method!r}")


def encode_like_source(img: Image.Image, source_format: str | None, icc_profile: bytes | None) -> tuple[bytes, str]:
    """JPEG (quality 95) for JPEG sources, lossless PNG for everything else.

    EXIF is not carried over: the pixels are already upright (orientation applied), and the
    metadata of a photo with people in it is exactly what should not travel further.
    """
    buf = io.BytesIO()
    extra = {"icc_profile": icc_profile} if icc_profile else {}
    if source_format == "JPEG":
        img.save(buf, "JPEG", quality=95, **extra)
        return buf.getvalue(), "JPEG"
    img.save(buf, "PNG", **extra)
    return buf.getvalue(), "PNG"


def icc_profile_of(data: bytes) -> bytes | None:
    """The source's colour profile, so that re-encoded pixels keep their meaning.

    Only for RGB sources: a CMYK or greyscale profile does not describe the RGB pixels that
    ``decode_rgb`` produced from such a file.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.info.get("icc_profile") if im.mode in ("RGB", "RGBA") else None
    except Exception:
        return None
