"""Decode and validate: every odd input gets a reason or a normalised, upright RGB image."""

import io
import json

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from curation import schema
from curation.imaging import decode_rgb
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
