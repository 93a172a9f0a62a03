"""Perceptual hashes and Hamming-radius search on binary codes."""

import itertools
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from curation.dedup.binary import bits_to_codes, hamming, hamming_pairs, uint64_to_codes
from curation.imaging import decode_rgb
from curation.stages.phash import image_hash


def brute_pairs(codes, radius):
    n = len(codes)
    out = set()
    for i in range(n):
        d = hamming(np.broadcast_to(codes[i], codes.shape), codes)
        out.update((i, int(j)) for j in np.flatnonzero(d <= radius) if j > i)
    return out


@pytest.fixture(scope="module")
def planted_codes():
    """600 random 64-bit codes plus copies with 0..6 flipped bits."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (600, 8), dtype=np.uint8)
    copies = base[:200].copy()
    bits = np.unpackbits(copies, axis=1)
    for row, flips in zip(bits, rng.integers(0, 7, 200)):
        row[rng.choice(64, flips, replace=False)] ^= 1
    return np.vstack([base, np.packbits(bits, axis=1)])


@pytest.mark.parametrize("radius", [0, 1, 3, 6])
@pytest.mark.parametrize("method", ["flat", "multihash"])
def test_range_search_is_exact(planted_codes, radius, method):
    i, j, d, used = hamming_pairs(planted_codes, radius, method)
    assert set(zip(i.tolist(), j.tolist())) == brute_pairs(planted_codes, radius)
    assert (i < j).all()
    assert (d == hamming(planted_codes[i], planted_codes[j])).all() and (d <= radius).all()
    if radius:
        assert used.startswith(method)


def test_multihash_is_chosen_for_large_inputs():
    rng = np.random.default_rng(1)
    codes = rng.integers(0, 256, (60_000, 8), dtype=np.uint8)
    codes[1] = codes[0]
    codes[2] = codes[0] ^ np.array([1, 0, 0, 0, 0, 0, 0, 2], np.uint8)
    i, j, d, used = hamming_pairs(codes, 4)
    assert used.startswith("multihash")
    found = set(zip(i.tolist(), j.tolist()))
    # 0 and 1 are equal: folded into one code, so 2 links to the first of them only.
    assert {(0, 1), (0, 2)} <= found and (1, 2) not in found


def test_a_code_repeated_many_times_costs_linear_edges_and_keeps_its_neighbours():
    rng = np.random.default_rng(3)
    codes = rng.integers(0, 256, (2_000, 8), dtype=np.uint8)
    codes[:1500] = 0  # a blank image, 1,500 times
    codes[1500] = np.array([0, 0, 0, 0, 0, 0, 0, 3], np.uint8)  # 2 bits from blank
    i, j, d, _ = hamming_pairs(codes, 4)
    assert len(i) < 1600  # star edges, not 1500 * 1499 / 2 pairs
    from curation.dedup.components import connected_components

    labels = connected_components(len(codes), i, j)
    assert len(set(labels[:1501].tolist())) == 1


def test_code_layout_matches_imagehash_hex():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    value = image_hash(img, "phash")
    assert f"{value:016x}" == str(imagehash.phash(img, hash_size=8))
    codes = uint64_to_codes(np.array([value], np.uint64))
    assert codes.tobytes().hex() == f"{value:016x}"
    assert (bits_to_codes(imagehash.phash(img).hash.reshape(1, -1)) == codes).all()


FIXTURE_COPIES = ["mixed_images/ukbench00120_resize.jpg", "ukbench00120_gray.jpg", "mixed_images/ukbench00120.jpg"]


@pytest.mark.parametrize("method", ["phash", "dhash", "whash"])
def test_real_photo_copies_match_and_distinct_photos_do_not(shared_data: Path, method):
    root = shared_data / "imagededup_fixtures"

    def h(rel):
        return image_hash(decode_rgb((root / rel).read_bytes()), method)

    original = h("base_images/ukbench00120.jpg")
    for rel in FIXTURE_COPIES:
        assert bin(original ^ h(rel)).count("1") <= 4, rel
    distinct = [h(p.relative_to(root)) for p in sorted((root / "base_images").glob("*.jpg"))]
    assert len(distinct) == 10
    assert min(bin(a ^ b).count("1") for a, b in itertools.combinations(distinct, 2)) > 10
