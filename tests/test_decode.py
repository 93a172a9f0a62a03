"""Decode and validate: every odd input gets a reason or a normalised, upright RGB image."""

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation import schema
from curation.imaging import DecodeError, decode_rgb, probe
from curation.stage import StageContext
from curation.stages.decode import DecodeConfig, DecodeStage


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def photo(w=120, h=90, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def stage(tmp_path):
    s = DecodeStage(DecodeConfig(min_side=32, max_aspect_ratio=4.0, max_pixels=4_000_000), StageContext(tmp_path, tmp_path / "s"))
    s.setup()
    return s


def run(stage, blobs):
    out = stage.process(pa.table({schema.UID: list(range(len(blobs))), schema.BYTES: pa.array(blobs, pa.binary())}))
    return out.to_pylist()


def test_plain_jpeg_keeps_its_bytes(stage):
    data = encode(photo(), "JPEG")
    (row,) = run(stage, [data])
    assert row["drop_reason"] is None and row["bytes"] is None  # null = unchanged
    assert (row["width"], row["height"], row["format"], row["normalized"]) == (120, 90, "JPEG", False)


def test_exif_rotation_is_applied_and_normalised(stage):
    img = photo(120, 60)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    (row,) = run(stage, [encode(img, "JPEG", exif=exif)])
    assert (row["width"], row["height"]) == (60, 120)
    assert row["normalized"] and decode_rgb(row["bytes"]).size == (60, 120)
    assert Image.open(io.BytesIO(row["bytes"])).getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize(
    "make,fmt,expected_mode",
    [
        (lambda: photo().convert("CMYK"), "JPEG", "CMYK"),
        (lambda: photo().convert("P", palette=Image.Palette.ADAPTIVE), "PNG", "P"),
        (lambda: photo().convert("RGBA"), "PNG", "RGBA"),
        (lambda: Image.fromarray((np.arange(120 * 90).reshape(90, 120) * 6).astype(np.uint16)), "PNG", "I;16"),
        (lambda: photo().convert("1"), "BMP", "1"),
    ],
)
def test_odd_modes_become_rgb(stage, make, fmt, expected_mode):
    (row,) = run(stage, [encode(make(), fmt)])
    assert row["drop_reason"] is None, row
    assert row["mode"].startswith(expected_mode[:1])
    assert row["normalized"]
    assert Image.open(io.BytesIO(row["bytes"])).mode == "RGB"


def test_sixteen_bit_keeps_its_dynamic_range():
    arr = (np.linspace(0, 65535, 120 * 90).reshape(90, 120)).astype(np.uint16)
    rgb = np.asarray(decode_rgb(encode(Image.fromarray(arr), "PNG")))
    assert rgb.min() < 10 and rgb.max() > 245


def test_animated_gif_first_frame(stage):
    frames = [photo(seed=i).convert("P") for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    (row,) = run(stage, [buf.getvalue()])
    assert row["drop_reason"] is None and row["normalized"] and row["format"] == "PNG"


def test_alpha_is_composited_on_white():
    img = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    assert decode_rgb(encode(img, "PNG")).getpixel((5, 5)) == (255, 255, 255)


@pytest.mark.parametrize(
    "blob,reason",
    [
        (b"", "zero_bytes"),
        (b"<html>hello</html>", "not_image"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, "corrupt"),
    ],
)
def test_bad_bytes_have_reasons(stage, blob, reason):
    (row,) = run(stage, [blob])
    assert row["drop_reason"] == reason
    assert "error" in json.loads(row["drop_details"])


def test_truncated(stage):
    data = encode(photo(400, 300), "JPEG")
    (row,) = run(stage, [data[: len(data) // 2]])
    assert row["drop_reason"] == "truncated"


def test_size_rules(stage):
    small, wide = encode(photo(20, 20), "PNG"), encode(photo(400, 50), "PNG")
    rows = run(stage, [small, wide])
    assert [r["drop_reason"] for r in rows] == ["too_small", "extreme_aspect"]
    assert json.loads(rows[1]["drop_details"])["max_aspect_ratio"] == 4.0


def test_decompression_bomb_refused_before_decoding(stage):
    # A 3000x3000 PNG of one colour is a few KB but 9 MP, above this stage's 4 MP cap.
    bomb = encode(Image.new("L", (3000, 3000)), "PNG")
    assert len(bomb) < 50_000
    (row,) = run(stage, [bomb])
    assert row["drop_reason"] == "decompression_bomb"


def test_format_is_sniffed_not_taken_from_the_name(stage, shared_data):
    fixtures = shared_data / "imagededup_fixtures" / "formats_images"
    rows = run(stage, [(fixtures / n).read_bytes() for n in ("ukbench09380.bmp", "ukbench09380.svg", "ukbench09380.webp")])
    assert [r["format"] for r in rows] == ["JPEG", "JPEG", "WEBP"]


def smooth_photo(w=400, h=300) -> Image.Image:
    """A picture that compresses like a photo (random noise would make every cut look alike)."""
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * 0.7 + yy * 0.3) % 256, (xx * 0.2 + yy * 0.9) % 256, (xx * yy / 300) % 256], -1)
    return Image.fromarray(arr.astype(np.uint8))


@pytest.mark.parametrize("fraction", [0.5, 0.8, 0.97])
def test_jpeg_cut_short_and_closed_with_an_end_marker_is_truncated(stage, fraction):
    """libjpeg fills the missing blocks with flat grey and Pillow reports success; the stage
    must not emit an image whose bottom is that fill."""
    data = encode(smooth_photo(), "JPEG", quality=90)
    damaged = data[: int(len(data) * fraction)] + b"\xff\xd9"
    assert Image.open(io.BytesIO(damaged)).convert("RGB").size == (400, 300)  # Pillow accepts it
    (row,) = run(stage, [damaged])
    assert row["drop_reason"] == "truncated"
    with pytest.raises(DecodeError) as e:  # every stage and the trainer decode through here
        decode_rgb(damaged, min_size=32)
    assert e.value.reason == "truncated"


def test_a_picture_that_really_ends_in_flat_grey_is_kept(stage):
    arr = np.asarray(smooth_photo()).copy()
    arr[200:] = 128  # the bottom third is the grey that libjpeg's fill would produce
    (row,) = run(stage, [encode(Image.fromarray(arr), "JPEG", quality=90)])
    assert row["drop_reason"] is None


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """The same file with its frame header (SOF0) claiming another size."""
    i = data.index(b"\xff\xc0")
    return data[: i + 5] + height.to_bytes(2, "big") + width.to_bytes(2, "big") + data[i + 9 :]


def test_header_claiming_far_more_pixels_than_the_file_holds_is_implausible(stage):
    tiny = encode(Image.new("RGB", (16, 16), (90, 120, 60)), "JPEG", quality=50)
    liar = jpeg_with_size(tiny, 9400, 9400)
    assert len(liar) < 1000 and 9400 * 9400 < stage.config.max_pixels * 25  # below the 4 MP cap only by x25
    big_cap = DecodeStage(DecodeConfig(), StageContext(Path("."), Path("s")))
    (row,) = run(big_cap, [liar])  # default limits: 88 MP is under Pillow's bomb threshold
    assert row["drop_reason"] == "implausible_size"
    assert "9400x9400" in json.loads(row["drop_details"])["error"]
    with pytest.raises(DecodeError) as e:
        probe(liar)
    assert e.value.reason == "implausible_size"


def test_decoded_memory_cap_is_configurable_and_on_by_default(tmp_path):
    # 9000x8000 one-bit pixels: a 10 KB PNG under Pillow's bomb threshold (72 of 89 MP) that
    # would take 288 MB once decoded to RGB.
    big = encode(Image.new("1", (9000, 8000)), "PNG")
    assert len(big) < 20_000
    with pytest.raises(DecodeError) as e:
        decode_rgb(big)  # the trainer's loader calls exactly this
    assert e.value.reason == "decoded_too_large"
    small = encode(Image.new("L", (1000, 800)), "PNG")
    capped = DecodeStage(DecodeConfig(max_decoded_bytes=3_000_000), StageContext(tmp_path, tmp_path / "s"))
    rows = run(capped, [small, encode(Image.new("L", (800, 800)), "PNG")])
    assert [r["drop_reason"] for r in rows] == ["decoded_too_large", None]
