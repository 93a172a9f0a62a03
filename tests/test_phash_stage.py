"""The phash stage hashes a shared thumbnail of a JPEG decoded no larger than it needs, and its
values stay imagehash's."""

import io

import imagehash
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageOps

from curation import schema
from curation.imaging import decode_rgb
from curation.stage import StageContext
from curation.stages.phash import PhashConfig, PhashStage, image_hash, image_hashes


def photo(seed: int, size=(300, 220)) -> Image.Image:
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * rng.uniform(0.2, 2) + yy * rng.uniform(0.2, 2) + rng.uniform(0, 255)) % 256 for _ in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 10, (h, w, 3)), 0, 255).astype(np.uint8))


@pytest.mark.parametrize("method", ["phash", "dhash", "whash"])
def test_shared_thumbnail_gives_imagehash_values_for_the_image_and_its_mirror(method):
    fn = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash}[method]
    for seed in range(5):
        img = photo(seed)
        value, mirrored = image_hashes(img.convert("L"), method, flip=True)
        assert f"{value:016x}" == str(fn(img, hash_size=8))
        assert mirrored == image_hash(ImageOps.mirror(img), method)


def stage_hashes(tmp_path, blobs, **config):
    stage = PhashStage(PhashConfig(**config), StageContext(tmp_path, tmp_path / "s"))
    stage.setup()
    out = stage.process(pa.table({schema.BYTES: pa.array(blobs, pa.binary())}))
    return out.column("phash").to_pylist(), out.column("phash_flip").to_pylist()


def test_lossless_images_hash_exactly_as_a_full_decode(tmp_path):
    blobs = []
    for seed in range(4):
        buf = io.BytesIO()
        photo(seed, (900, 700)).save(buf, "PNG")
        blobs.append(buf.getvalue())
    hashes, flips = stage_hashes(tmp_path, blobs)
    for blob, h, f in zip(blobs, hashes, flips):
        img = decode_rgb(blob)
        assert (h, f) == (image_hash(img), image_hash(ImageOps.mirror(img)))


def test_large_jpegs_hash_within_a_few_bits_of_a_full_decode(tmp_path, shared_data):
    paths = sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[:40]
    blobs = [p.read_bytes() for p in paths]
    hashes, flips = stage_hashes(tmp_path, blobs)
    for blob, h, f in zip(blobs, hashes, flips):
        img = decode_rgb(blob)
        assert bin(h ^ image_hash(img)).count("1") <= 4
        assert bin(f ^ image_hash(ImageOps.mirror(img))).count("1") <= 4
