"""Decoding at the size a stage needs: JPEGs DCT-scaled as far as ``min_size`` allows, nothing
else about the result changes (orientation, modes, the limits)."""

import io

import numpy as np
import pytest
from PIL import Image

from curation.imaging import DecodeError, decode_gray, decode_rgb


def smooth(w: int, h: int) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 255 / w), (yy * 255 / h), ((xx + yy) * 127 / (w + h))], -1)
    return Image.fromarray(arr.astype(np.uint8))


def jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


@pytest.mark.parametrize(
    "min_size,expected",
    [(32, (200, 150)), ((200, 150), (200, 150)), ((201, 150), (400, 300)), ((300, 300), (400, 300)), (700, (1600, 1200)), (None, (1600, 1200))],
)
def test_jpeg_decodes_at_the_smallest_scale_that_is_still_large_enough(min_size, expected):
    assert decode_rgb(jpeg(smooth(1600, 1200)), min_size=min_size).size == expected


def test_min_size_is_in_upright_pixels_of_an_exif_rotated_photo():
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 1600x800, shown 800x1600
    data = jpeg(smooth(1600, 800), exif=exif)
    assert decode_rgb(data).size == (800, 1600)
    # Upright 100 wide and 300 tall is stored 300 wide and 100 tall: 1/4 scale, not 1/2.
    assert decode_rgb(data, min_size=(100, 300)).size == (200, 400)


def test_a_function_of_the_full_size_can_give_the_box():
    seen = []

    def half(w, h):
        seen.append((w, h))
        return (w // 2, h // 2)

    assert decode_rgb(jpeg(smooth(1600, 1200)), min_size=half).size == (800, 600)
    assert seen == [(1600, 1200)]


def test_scaled_decode_looks_like_the_full_decode_resized():
    data = jpeg(smooth(1600, 1200))
    small = np.asarray(decode_rgb(data, min_size=32), np.float32)
    reference = np.asarray(decode_rgb(data).resize((200, 150), Image.Resampling.BOX), np.float32)
    assert np.abs(small - reference).mean() < 2.0


@pytest.mark.parametrize("mode", ["L", "CMYK"])
def test_modes_are_normalised_as_at_full_size(mode):
    data = jpeg(smooth(800, 600).convert(mode))
    small, full = decode_rgb(data, min_size=100), decode_rgb(data)
    assert small.mode == full.mode == "RGB" and small.size == (200, 150)
    reference = np.asarray(full.resize(small.size, Image.Resampling.BOX), np.float32)
    assert np.abs(np.asarray(small, np.float32) - reference).mean() < 3.0


def test_other_formats_decode_at_full_size():
    buf = io.BytesIO()
    smooth(800, 600).save(buf, "PNG")
    assert decode_rgb(buf.getvalue(), min_size=32).size == (800, 600)


def test_limits_apply_to_the_full_size_whatever_the_scale():
    data = jpeg(smooth(1600, 1200))
    with pytest.raises(DecodeError) as e:
        decode_rgb(data, min_size=32, max_decoded_bytes=1600 * 1200 * 4 - 1)
    assert e.value.reason == "decoded_too_large"


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_gray_decode_is_the_rgb_decode_converted(fmt):
    """JPEG luma comes straight from libjpeg (a level or two of rounding apart); other formats
    go through the RGB normalisation first, exactly."""
    exif = Image.Exif()
    exif[0x0112] = 8
    buf = io.BytesIO()
    smooth(640, 480).save(buf, fmt, exif=exif)
    gray, rgb = decode_gray(buf.getvalue(), min_size=100), decode_rgb(buf.getvalue(), min_size=100)
    assert gray.mode == "L" and gray.size == rgb.size == ((120, 160) if fmt == "JPEG" else (480, 640))
    diff = np.abs(np.asarray(gray, np.int16) - np.asarray(rgb.convert("L"), np.int16))
    assert diff.max() <= (2 if fmt == "JPEG" else 0)
