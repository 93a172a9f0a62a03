"""Safe image decoding shared by every stage that looks at pixels.

Every stage decodes through ``decode_rgb`` so that EXIF orientation, CMYK, 16-bit, palette,
alpha and animated images are handled the same way everywhere, and images that would cost more
memory than they are worth are refused before Pillow allocates their pixels: decompression bombs
(pixel count), headers that claim more pixels than the file's bytes can encode
(``implausible_size``) and a per-image cap on decoded memory (``decoded_too_large``).

Stages that only use a reduced copy (hashes, pixel descriptors, model inputs, face detection)
pass ``min_size``: JPEGs are then decoded with libjpeg's DCT scaling (1/2, 1/4 or 1/8), which
skips most of the inverse transform and colour conversion, as far as the result stays at least
that large. Everything else about the result (orientation, mode handling) is the same.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFile, ImageOps

# Never let Pillow silently pad a truncated file with grey: a truncated file is a drop.
ImageFile.LOAD_TRUNCATED_IMAGES = False

DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~0.25 GB of RGB)
# Pillow holds an RGB pixel in 4 bytes (as it does RGBA, CMYK and the 32-bit modes), so a full
# decode needs width x height x 4 bytes at least. 256 MiB (67 megapixels) is below what Pillow's
# bomb limit lets through (358 MB) and above any camera JPEG up to 64 MP.
DEFAULT_MAX_DECODED_BYTES = 256 * 2**20
BYTES_PER_DECODED_PIXEL = 4

# The most pixels one byte of a file can describe, by format; a header that claims more is a
# lie (a 693-byte JPEG whose header says 9400x9400). Bounds are the coding's own limits, x2:
#   JPEG (Huffman): every 8x8 block of every component costs >= 1 bit -> <= 512 px/byte (grey);
#   PNG: deflate expands at most 1032:1 and 1-bit pixels pack 8 per byte -> <= 8256 px/byte;
#   GIF: one LZW code of >= 12 bits once the table is full covers <= 4096 px -> <= 2731 px/byte;
#   BMP: RLE spends 2 bytes per run of <= 255 px -> <= 128 px/byte (1-bit raw: 8).
# Arithmetic-coded JPEG, WebP, TIFF and HEIF/AVIF can code flat areas in almost nothing, so
# only the pixel and memory caps apply to them.
MAX_PIXELS_PER_BYTE = {"JPEG": 1024, "MPO": 1024, "PNG": 16512, "GIF": 5462, "BMP": 256}
_JPEG_ARITHMETIC_SOF = {0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}

# min_size: a (width, height), a square side, or a function of the full upright (width, height).
MinSize = int | tuple[int, int] | Callable[[int, int], tuple[int, int]] | None


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


def _jpeg_is_arithmetic(data: bytes) -> bool:
    """Whether the JPEG's frame header is arithmetic-coded (segments up to the first scan only)."""
    i = 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _JPEG_ARITHMETIC_SOF:
            return True
        if marker == 0xDA:  # start of scan: the frame header came before it
            return False
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return False


def _info(img: Image.Image, data: bytes, max_pixels: int, max_decoded_bytes: int) -> ImageInfo:
    w, h = img.size
    pixels = w * h
    if pixels > max_pixels:
        raise DecodeError("decompression_bomb", f"{w}x{h} pixels exceeds the cap of {max_pixels}")
    per_byte = MAX_PIXELS_PER_BYTE.get(img.format or "")
    if per_byte and pixels > per_byte * len(data) and not (img.format in ("JPEG", "MPO") and _jpeg_is_arithmetic(data)):
        raise DecodeError(
            "implausible_size",
            f"header claims {w}x{h} pixels, more than {len(data)} bytes of {img.format} can encode (at most {per_byte} pixels per byte)",
        )
    if pixels * BYTES_PER_DECODED_PIXEL > max_decoded_bytes:
        raise DecodeError(
            "decoded_too_large",
            f"{w}x{h} pixels need {pixels * BYTES_PER_DECODED_PIXEL} bytes decoded, above the cap of {max_decoded_bytes}",
        )
    orientation = img.getexif().get(0x0112, 1) if hasattr(img, "getexif") else 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return ImageInfo(img.format, w, h, img.mode, getattr(img, "n_frames", 1), orientation or 1)


def probe(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES) -> ImageInfo:
    """Read the header only (no pixel decode): format, size after EXIF rotation, mode."""
    _check_header(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _info(Image.open(io.BytesIO(data)), data, max_pixels, max_decoded_bytes)
    except DecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DecodeError("decompression_bomb", str(e)) from None
    except Exception as e:  # Pillow raises many types for bad headers
        raise DecodeError("corrupt", f"cannot read image header: {e}") from None


def decode_rgb(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_size: MinSize = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """Decode to an RGB image with EXIF orientation applied.

    Alpha is composited on white (crawled logos and clip art are drawn for white pages);
    animated images contribute their first frame; 16-bit and CMYK are converted.

    ``min_size`` is the smallest (width, height) of the upright image the caller will use (an
    int is a square; a callable gets the full upright size and returns one). A JPEG is then
    decoded at 1/2, 1/4 or 1/8 scale, the smallest that is still at least that large on both
    sides; other formats, and JPEGs already that small, decode at full size.
    """
    return decode_with_info(data, max_pixels, min_size=min_size, max_decoded_bytes=max_decoded_bytes)[0]


def decode_gray(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_size: MinSize = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> Image.Image:
    """``decode_rgb(...).convert("L")``, but a colour JPEG gives libjpeg's luma directly
    (the same weights as Pillow's conversion, without decoding and converting the chroma)."""
    return decode_with_info(data, max_pixels, min_size=min_size, max_decoded_bytes=max_decoded_bytes, mode="L")[0]


def decode_with_info(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    *,
    min_size: MinSize = None,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
    mode: str = "RGB",
) -> tuple[Image.Image, ImageInfo]:
    """``decode_rgb`` (or ``decode_gray`` with ``mode="L"``) plus the header facts (full-size,
    upright), from one parse of the file."""
    _check_header(data)
    stage = "header"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            info = _info(img, data, max_pixels, max_decoded_bytes)
            stage = "pixels"
            img.seek(0)
            scale = _draft(img, info, min_size, mode)
            img.load()
            if info.format in ("JPEG", "MPO") and _filled_tail(img, scale) and _cut_short(data, info, min_size, mode, img):
                raise DecodeError("truncated", "JPEG data ends before the last block (the rest would be grey fill)")
            if info.orientation in _TRANSPOSES:  # exif_transpose, minus the copy it makes of upright images
                img = ImageOps.exif_transpose(img)
            img = to_rgb(img)
            return (img if mode == "RGB" else img.convert(mode)), info
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


_TRANSPOSES = (2, 3, 4, 5, 6, 7, 8)  # EXIF orientations that move pixels


def draft_box(info: ImageInfo, min_size: MinSize) -> tuple[int, int] | None:
    """The (width, height) ``min_size`` asks for, in the file's stored orientation."""
    if min_size is None:
        return None
    if callable(min_size):
        box = min_size(info.width, info.height)
    elif isinstance(min_size, int):
        box = (min_size, min_size)
    else:
        box = min_size
    w, h = (max(1, int(v)) for v in box)
    return (h, w) if info.orientation in (5, 6, 7, 8) else (w, h)


def _draft(img: Image.Image, info: ImageInfo, min_size: MinSize, mode: str = "RGB") -> int:
    """Ask libjpeg for DCT-scaled output (and for luma only when ``mode`` is L); returns the
    scale denominator (1 = full size)."""
    if info.format not in ("JPEG", "MPO"):
        return 1
    box = draft_box(info, min_size)
    luma = mode == "L" and img.mode == "RGB"  # YCbCr coded; CMYK and grey JPEGs keep their mode
    if box is None and not luma:
        return 1
    full = img.size
    img.draft("L" if luma else None, box)
    return max(1, round(full[0] / img.size[0]))


def _tail(img: Image.Image, scale: int) -> np.ndarray:
    """The last 8x8 block of the stored image (at the decoded scale), where libjpeg's fill ends."""
    side = max(1, 8 // scale)
    w, h = img.size
    return np.asarray(img.crop((max(0, w - side), max(0, h - side), w, h)))


def _filled_tail(img: Image.Image, scale: int) -> bool:
    """Cheap first test: a JPEG whose data ran out decodes its missing blocks with all-zero
    coefficients, i.e. flat mid-grey (128; 127 after Adobe CMYK inversion), to the very end."""
    tail = _tail(img, scale)
    return bool(((tail == 128) | (tail == 127)).all())


def _cut_short(data: bytes, info: ImageInfo, min_size: MinSize, mode: str, decoded: Image.Image) -> bool:
    """Confirms a grey tail is fill, not a grey picture: decode again with the end-of-image
    marker replaced by zero bytes. A complete file still decodes its last block from its own
    data (the zeros are only read ahead); a file cut short never gets there, so its last block
    stays unwritten instead of grey."""
    eoi = data.rfind(b"\xff\xd9")
    again = Image.open(io.BytesIO((data[:eoi] if eoi > 0 else data) + bytes(64)))
    scale = _draft(again, info, min_size, mode)
    try:
        again.load()
    except OSError:  # expected: the zeros never end in a marker; what was decoded stays
        if again.im is None:
            return True
        again = again._new(again.im)
    return not np.array_equal(_tail(again, scale), _tail(decoded, scale))


def to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits rather than clipping.
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
