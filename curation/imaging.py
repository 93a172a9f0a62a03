"""Safe image decoding shared by every stage that looks at pixels.

Every stage decodes through ``decode_rgb`` so that EXIF orientation, CMYK, 16-bit, palette,
alpha and animated images are handled the same way everywhere, and decompression bombs are
refused before Pillow allocates their pixels.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps

# Never let Pillow silently pad a truncated file with grey: a truncated file is a drop.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~0.25 GB of RGB)


class DecodeError(Exception):
    """An image that cannot be used; ``reason`` is the ledger reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass
class ImageInfo:
    format: str | None
    width: int
    height: int
    mode: str
    n_frames: int
    orientation: int = 1


# Magic numbers of the formats we accept: the format is sniffed, never taken from the name.
_MAGIC = [
    (b"\xff\xd8\xff", "JPEG"),
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
]


def sniff_format(data: bytes) -> str | None:
    """Image format from the first bytes, or None when it is not an image we know."""
    if not data:
        return None
    for magic, fmt in _MAGIC:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6") and len(data) > 2 and data[2:3].isspace():
        return "PPM"
    if data[4:12] in (b"ftypavif", b"ftypheic", b"ftypheix", b"ftypmif1"):
        return "AVIF" if data[8:12] == b"avif" else "HEIF"
    return None


def _check_header(data: bytes) -> None:
    if not data:
        raise DecodeError("zero_bytes", "empty file")
    if sniff_format(data) is None:
        raise DecodeError("not_image", "content is not a known image format")


def _info(img: Image.Image, max_pixels: int) -> ImageInfo:
    w, h = img.size
    if w * h > max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} pixels exceeds the cap of {max_pixels}")
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo(img.format, w, h, img.mode, getattr(img, "n_frames", 1), orientation or 1)


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageInfo:
    """Read the header only (no pixel decode): format, size after EXIF rotation, mode."""
    _check_header(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _info(Image.open(io.BytesIO(data)), max_pixels)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from None
    except Exception as e:  # Pillow raises many types for bad headers
        raise DecodeError("corrupt", f"cannot read image header: {e}") from None


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Fully decode to an RGB image with EXIF orientation applied.

    Alpha is composited on white (crawled logos and clip art are drawn for white pages);
    animated images contribute their first frame; 16-bit and CMYK are converted.
    """
    return decode_with_info(data, max_pixels)[0]


def decode_with_info(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[Image.Image, ImageInfo]:
    """``decode_rgb`` plus the header facts, from one parse of the file."""
    _check_header(data)
    stage = "header"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            info = _info(img, max_pixels)
            stage = "pixels"
            img.seek(0)
            img.load()
            img = ImageOps.exif_transpose(img)
            return to_rgb(img), info
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from None
    except (OSError, SyntaxError, ValueError) as e:
        msg = str(e)
        reason = "truncated" if "truncated" in msg.lower() else "corrupt"
        raise DecodeError(reason, f"cannot decode image ({stage}): {msg}") from None
    except Exception as e:
        raise DecodeError("corrupt", f"cannot decode image ({stage}): {type(e).__name__}: {e}") from None


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clipping.
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        hi = arr.max() if arr.size else 1.0
        scale = 255.0 / (65535.0 if hi > 255 else 255.0)
        img = Image.fromarray(np.clip(arr * scale, 0, 255).astype("uint8"), "L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    return img.convert("RGB")


def encode(img: Image.Image, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt.upper() in ("JPEG", "JPG"):
        img.save(buf, "JPEG", quality=quality, optimize=False)
    else:
        img.save(buf, fmt.upper())
    return buf.getvalue()
