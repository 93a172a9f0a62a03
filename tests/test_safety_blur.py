"""Blurring primitives: where the blur lands, how strong it is, how the result is encoded."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from curation.safety.blur import blur_region, encode_like_source, enlarge_box, icc_profile_of


def textured(size=(200, 160), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_enlarge_box_grows_each_side_by_the_margin_and_clips():
    assert enlarge_box((50, 40, 150, 120), 0.2, (400, 300)) == (30, 24, 170, 136)
    assert enlarge_box((5, 5, 105, 45), 0.5, (120, 60)) == (0, 0, 120, 60)
    assert enlarge_box((10.4, 10.6, 20.2, 20.9), 0.0, (100, 100)) == (10, 10, 21, 21)


@pytest.mark.parametrize("method,strength", [("gaussian", 0.15), ("pixelate", 8)])
def test_blur_changes_the_region_only(method, strength):
    img = textured()
    before = np.asarray(img).astype(int)
    region = (40, 30, 140, 130)
    blur_region(img, region, method, strength)
    after = np.asarray(img).astype(int)
    outside = np.ones(before.shape[:2], bool)
    outside[30:130, 40:140] = False
    assert np.array_equal(before[outside], after[outside])
    inside_before, inside_after = before[30:130, 40:140], after[30:130, 40:140]
    # Noise loses almost all of its local contrast.
    assert np.abs(np.diff(inside_after, axis=1)).mean() < 0.2 * np.abs(np.diff(inside_before, axis=1)).mean()


def test_pixelation_leaves_a_fixed_number_of_blocks_whatever_the_face_size():
    for side in (40, 400):
        img = textured((side, side), seed=side)
        blur_region(img, (0, 0, side, side), "pixelate", 8)
        step = side // 8
        blocks = np.asarray(img).reshape(8, step, 8, step, 3)
        # Every one of the 8x8 blocks is a single colour.
        assert (blocks == blocks[:, :1, :, :1]).all()


def test_gaussian_radius_scales_with_the_region():
    small, large = textured((100, 100), 1), textured((400, 400), 2)
    blur_region(small, (0, 0, 100, 100), "gaussian", 0.15)
    blur_region(large, (0, 0, 400, 400), "gaussian", 0.15)
    # Same relative blur: a 4x larger face blurred with a 4x larger radius looks the same when
    # brought to the same size, so its residual texture per pixel is 4x lower or less.
    g_small = np.abs(np.diff(np.asarray(small).astype(int), axis=1)).mean()
    g_large = np.abs(np.diff(np.asarray(large).astype(int), axis=1)).mean()
    assert g_large < g_small / 2


def test_encoding_follows_the_source_format():
    img = textured()
    data, fmt = encode_like_source(img, "JPEG", None)
    assert fmt == "JPEG" and data[:3] == b"\xff\xd8\xff"
    for source in ("PNG", "WEBP", "GIF", None):
        data, fmt = encode_like_source(img, source, None)
        assert fmt == "PNG" and data[:8] == b"\x89PNG\r\n\x1a\n"
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")), np.asarray(img))


def test_colour_profile_of_an_rgb_source_is_kept():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    textured().save(buf, "JPEG", icc_profile=profile)
    assert icc_profile_of(buf.getvalue()) == profile
    data, _ = encode_like_source(textured(), "JPEG", icc_profile_of(buf.getvalue()))
    assert Image.open(io.BytesIO(data)).info.get("icc_profile") == profile

    cmyk = io.BytesIO()
    Image.new("CMYK", (8, 8)).save(cmyk, "JPEG", icc_profile=b"not an rgb profile")
    assert icc_profile_of(cmyk.getvalue()) is None
