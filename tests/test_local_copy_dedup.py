"""Copy detection with local features, on real photos: crops, flips, blank images, unrelated
photos and overlays shared by unrelated photos; both execution forms agree.

Features go through the ``local_features`` stage itself (``process`` on JPEG bytes), the copy
stage through the same run directory and writers as ``curate run`` (tests/partitioned_helpers).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageDraw, ImageOps

from curation.dedup.geometry import VerifySettings, pixel_agreement, verify_pair
from curation.dedup.local_features import MIRROR_PERMUTATION, Extractor, from_row
from curation.stage import StageContext
from curation.stages.local_copy_dedup import LocalCopyDedupStage
from curation.stages.local_features import KEYPOINTS, LocalFeaturesConfig, LocalFeaturesStage, downscaled_gray
from tests.partitioned_helpers import both_forms, drops_of, ledger_of, run_single, spec_for, write_run

EXACT = {"search": {"list_size": 400, "list_probe": 1000}}  # every coarse list probed: exact search


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def photos(shared_data) -> list[Image.Image]:
    files = sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[::83][:12]
    return [Image.open(f).convert("RGB") for f in files]


def extract(blobs: list[bytes], **config) -> pa.Table:
    stage = LocalFeaturesStage(LocalFeaturesConfig(kind="local_features", **config), StageContext(Path("."), Path(".")))
    stage.setup()
    return stage.process(pa.table({"bytes": pa.array(blobs, pa.binary())}))


def stage_table(blobs: list[bytes], **config) -> pa.Table:
    out = extract(blobs, **config)
    sizes = [Image.open(io.BytesIO(b)).size for b in blobs]
    return pa.table({
        "local_features": out.column("local_features"),
        "width": pa.array([w for w, _ in sizes], pa.int32()),
        "height": pa.array([h for _, h in sizes], pa.int32()),
    })


def crop_of(img: Image.Image) -> Image.Image:
    """A 60% crop (by area), rescaled to 70% and re-encoded at quality 40."""
    w, h = img.size
    box = (int(w * 0.12), int(h * 0.1), int(w * 0.12) + int(w * 0.78), int(h * 0.1) + int(h * 0.78))
    small = img.crop(box).resize((int(w * 0.78 * 0.7), int(h * 0.78 * 0.7)), Image.Resampling.BILINEAR)
    return Image.open(io.BytesIO(jpeg(small, 40)))


def run_stage(tmp_path: Path, table: pa.Table, config: dict, shard_rows: int = 6):
    base = write_run(tmp_path, table, shard_rows)
    spec = spec_for(LocalCopyDedupStage, config, tmp_path, base)
    stats = run_single(tmp_path, spec)
    return stats, drops_of(tmp_path, spec), ledger_of(tmp_path, spec)


def uid_of(row: int, shard_rows: int = 6) -> int:
    return (row // shard_rows) << 20 | (row % shard_rows)


# -- the stage, end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def planted(photos):
    """Rows 0-9: unrelated photos; 10: a crop of photo 0; 11: photo 1 mirrored; 12: a blank."""
    blobs = [jpeg(p) for p in photos[:10]]
    blobs.append(jpeg(crop_of(photos[0])))
    blobs.append(jpeg(ImageOps.mirror(photos[1])))
    blobs.append(jpeg(Image.new("RGB", (320, 240), (128, 128, 128))))
    return blobs, stage_table(blobs)


def test_crop_and_flip_are_dropped_naming_their_originals_and_nothing_else(tmp_path, planted, photos):
    _, table = planted
    stats, drops, ledger = run_stage(tmp_path, table, {**EXACT, "mirror": True})
    assert drops.column("uid").to_pylist() == [uid_of(10), uid_of(11)]
    crop, flip = (json.loads(d) for d in drops.column("drop_details").to_pylist())
    assert crop["kept_uid"] == uid_of(0) and flip["kept_uid"] == uid_of(1)
    assert crop["verified"] and crop["inliers"] >= 12 and not crop["transform"]["mirrored"]
    assert flip["verified"] and flip["transform"]["mirrored"]
    # The transform maps the crop's pixels to the original's feature image (its longer side
    # downscaled to max_side 400): scale 1/0.7 of that, offset where the crop box started.
    w, h = photos[0].size
    s0 = min(1.0, 400 / max(w, h))
    (a, b, tx), (c, d, ty) = crop["transform"]["matrix"]
    assert crop["transform"]["scale"] == pytest.approx(s0 / 0.7, rel=0.03)
    assert abs(b) < 0.02 and abs(c) < 0.02
    assert tx == pytest.approx(s0 * int(w * 0.12), abs=3) and ty == pytest.approx(s0 * int(h * 0.1), abs=3)
    assert set(ledger.column("reason").to_pylist()) == {"local_copy_duplicate"}
    assert stats["summary"]["too_few_keypoints"] == 1


def test_without_mirroring_the_flip_is_kept(tmp_path, planted):
    _, table = planted
    _, drops, _ = run_stage(tmp_path, table, {**EXACT, "mirror": False})
    assert drops.column("uid").to_pylist() == [uid_of(10)]


def test_a_blank_image_has_no_features_and_is_never_dropped(planted):
    blobs, _ = planted
    out = extract([blobs[12], blobs[0]])
    assert out.column("local_features").to_pylist()[0] is None
    assert out.column(KEYPOINTS).to_pylist()[0] < LocalFeaturesConfig(kind="local_features").min_keypoints
    assert out.column("drop_reason").null_count == 2  # recorded, not dropped


def test_unrelated_photos_are_rejected_by_verification(planted):
    _, table = planted
    feats = [from_row(r) for r in table.column("local_features").to_pylist()[:10]]
    s = VerifySettings()
    verdicts = [verify_pair(feats[i], feats[j], s, mirror=True) for i in range(10) for j in range(i + 1, 10)]
    assert not any(v.ok for v in verdicts)
    assert max(v.inliers for v in verdicts) < s.min_inliers * 2


def test_an_overlay_shared_by_unrelated_photos_does_not_make_them_copies(tmp_path, photos):
    """The same badge (a watermark-like overlay) on ten unrelated photos: a template."""
    blobs = []
    for p in photos[:10]:
        img = p.copy()
        d = ImageDraw.Draw(img)
        r = min(img.size) // 6
        d.ellipse((10, 10, 10 + 2 * r, 10 + 2 * r), fill=(255, 204, 0), outline=(0, 0, 0), width=3)
        d.rectangle((10 + r // 2, 10 + r // 2, 10 + r, 10 + r), fill=(0, 0, 0))
        d.text((12, 12 + 2 * r), "stock photo", fill=(255, 255, 255))
        blobs.append(jpeg(img))
    _, drops, _ = run_stage(tmp_path, stage_table(blobs), {**EXACT, "search": {**EXACT["search"], "max_recurrence": 6}})
    assert drops.num_rows == 0


def test_orb_features_find_the_crop_too(tmp_path, photos):
    blobs = [jpeg(p) for p in photos[:6]] + [jpeg(crop_of(photos[2]))]
    table = stage_table(blobs, method="orb", max_keypoints=500)
    _, drops, _ = run_stage(tmp_path, table, {**EXACT, "mirror": False, "search": {**EXACT["search"], "max_keypoints": 500, "min_similarity": 0.6}})
    assert drops.column("uid").to_pylist() == [uid_of(6)]
    assert json.loads(drops.column("drop_details")[0].as_py())["kept_uid"] == uid_of(2)


def test_both_forms_agree_on_real_photos(tmp_path, planted, photos):
    blobs, _ = planted
    more = [jpeg(ImageOps.expand(photos[3], border=40, fill=(20, 20, 20))), jpeg(photos[4].rotate(10, resample=Image.Resampling.BILINEAR))]
    table = stage_table(blobs + more)
    (single, d1, l1), (parted, d2, l2) = both_forms(
        tmp_path, table, LocalCopyDedupStage, {**EXACT, "mirror": True}, shard_rows=3, max_partition_rows=3000, map_task_rows=5
    )
    assert d1.num_rows == 4 and d1.equals(d2) and l1.equals(l2)
    assert parted["execution"] == "partitioned"
    for key in ("too_few_keypoints", "descriptors", "lists", "edges_geometric", "components", "dropped"):
        assert parted["summary"][key] == single["summary"][key], key
    tasks = {s["step"]: s["tasks"] for s in parted["steps"]}
    assert tasks["search"] > 1 and tasks["verify"] > 1 and tasks["ship"] > 1


# -- the pieces -----------------------------------------------------------------------------------
def test_mirrored_descriptors_match_opencv_on_the_mirrored_photo(photos):
    """Rows reversed and orientation bins negated: the SIFT descriptor of the mirrored patch."""
    gray = downscaled_gray(jpeg(photos[5]), 400)
    ex = Extractor("rootsift", 256)
    f, fm = ex(gray), ex(np.ascontiguousarray(gray[:, ::-1]))
    mirrored = f.mirrored()
    permuted, plain = [], []
    vm, vf, vo = mirrored.vectors(), fm.vectors(), f.vectors()
    for i, (x, y) in enumerate(mirrored.xy):
        near = np.flatnonzero(np.hypot(fm.xy[:, 0] - x, fm.xy[:, 1] - y) < 0.5)  # one point may carry several orientations
        if len(near):
            permuted.append(float((vf[near] @ vm[i]).max()))
            plain.append(float((vf[near] @ vo[i]).max()))
    assert len(permuted) > 20
    assert np.median(permuted) > 0.95 and np.median(plain) < 0.9
    assert sorted(MIRROR_PERMUTATION.tolist()) == list(range(128))


# -- copy_dedup's ambiguous band ------------------------------------------------------------------
def band_descriptors(n: int, pairs: dict[tuple[int, int], float], dim: int = 64) -> np.ndarray:
    """Unit vectors, orthogonal except for ``pairs`` (a, b) at the given cosine."""
    x = np.eye(n, dim, dtype=np.float32)
    for (a, b), sim in pairs.items():
        x[b] = sim * x[a] + np.sqrt(1 - sim**2) * np.eye(n, dim, dtype=np.float32)[b]
    return x


def test_copy_dedup_band_verifies_middling_similarities_in_both_forms(tmp_path, planted):
    """Crop (row 10) of photo 0 at cosine 0.6: verified, an edge. Unrelated photos 2 and 3 at
    0.6: not verified, kept. Photos 4 and 5 at 0.8: above the band, an edge without looking.
    Photos 6 and 7 at 0.4: below the band, never looked at."""
    from curation.stages.copy_dedup import CopyDedupStage

    _, table = planted
    x = band_descriptors(table.num_rows, {(0, 10): 0.6, (2, 3): 0.6, (4, 5): 0.8, (6, 7): 0.4})
    table = table.append_column("sscd_descriptor", pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1]))
    config = {"band": {"low": 0.45, "high": 0.75}, "index": {"spec": "Flat", "list_size": 6, "list_probe": 100}}
    (single, d1, l1), (parted, d2, _) = both_forms(tmp_path, table, CopyDedupStage, config, shard_rows=4, max_partition_rows=2000, map_task_rows=6)
    assert d1.equals(d2) and parted["execution"] == "partitioned"
    details = {u: json.loads(d) for u, d in zip(d1.column("uid").to_pylist(), d1.column("drop_details").to_pylist())}
    uid = lambda row: uid_of(row, 4)  # noqa: E731
    area = (np.asarray(table.column("width")) * np.asarray(table.column("height"))).tolist()
    smaller_of_4_5 = 5 if area[5] <= area[4] else 4  # the keep rule: the larger image stays
    assert sorted(details) == sorted([uid(10), uid(smaller_of_4_5)])
    assert details[uid(10)]["evidence"] == "geometric" and details[uid(10)]["geometry"]["verified"]
    assert details[uid(10)]["kept_uid"] == uid(0) and details[uid(10)]["geometry"]["inliers"] >= 12
    other = next(d for u, d in details.items() if u != uid(10))
    assert other["evidence"] == "similarity" and other["similarity"] == pytest.approx(0.8, abs=1e-3)
    for s in (single["summary"], parted["summary"]):
        assert s["edges_similarity"] == 1 and s["edges_geometric"] == 1 and s["verified_pairs"] == 2, s


def collage(left: Image.Image, right: Image.Image, height: int = 240) -> Image.Image:
    """The left half of one photo beside the right half of another (a screenshot of two)."""
    a = left.resize((int(left.width * height / left.height), height))
    b = right.resize((int(right.width * height / right.height), height))
    out = Image.new("RGB", (a.width // 2 + b.width - b.width // 2, height))
    out.paste(a.crop((0, 0, a.width // 2, height)), (0, 0))
    out.paste(b.crop((b.width // 2, 0, b.width, height)), (a.width // 2, 0))
    return out


def test_star_grouping_never_drops_a_photo_only_chained_to_the_kept_one(tmp_path, photos):
    """A collage of halves of two unrelated photos verifies against both: as components the
    three are one group and an unrelated photo is dropped; with ``grouping: star`` only the
    collage is dropped, as a verified copy of the kept photo, in both execution forms."""
    blobs = [jpeg(p) for p in photos[:8]] + [jpeg(collage(photos[5], photos[6]))]
    table = stage_table(blobs)
    loose = {**EXACT, "mirror": False, "verify": {"min_agreement": 0.45}}  # the smaller half agrees at 0.48
    _, components, _ = run_stage(tmp_path / "components", table, loose)
    dropped = set(components.column("uid").to_pylist())
    assert uid_of(8) in dropped and len(dropped & {uid_of(5), uid_of(6)}) == 1  # the chain drops a photo
    (single, d1, l1), (parted, d2, l2) = both_forms(
        tmp_path / "star", table, LocalCopyDedupStage, {**loose, "grouping": "star"},
        shard_rows=3, max_partition_rows=3000, map_task_rows=4,
    )
    assert d1.column("uid").to_pylist() == [uid_of(8, 3)] and d1.equals(d2) and l1.equals(l2)
    details = json.loads(d1.column("drop_details")[0].as_py())
    assert details["kept_uid"] in (uid_of(5, 3), uid_of(6, 3)) and details["verified"]
    assert single["summary"]["grouping"] == parted["summary"]["grouping"] == "star"


def screenshot_of(img: Image.Image) -> Image.Image:
    """A 1280x800 page with the photo 220 px high in it (larger than the photo: kept first)."""
    page = Image.new("RGB", (1280, 800), (245, 245, 245))
    shot = img.resize((int(img.width * 220 / img.height), 220))
    page.paste(shot, ((1280 - shot.width) // 2, 80))
    return page


def small_crop_of(img: Image.Image) -> Image.Image:
    """The middle 36% of the photo at 96 px wide, re-encoded at quality 25."""
    w, h = img.size
    crop = img.crop((int(w * 0.2), int(h * 0.2), int(w * 0.8), int(h * 0.8)))
    return Image.open(io.BytesIO(jpeg(crop.resize((96, int(96 * crop.height / crop.width))), 25)))


def test_star_relay_drops_a_small_crop_through_the_photo_inside_a_kept_screenshot(tmp_path, photos):
    """A screenshot of a photo is the largest image and is kept; the photo verifies against it.
    A small re-encoded crop of the photo fails against the screenshot (too few of its keypoints
    meet the screenshot's downscaled copy) but verifies against the photo, inside the part of the
    photo that matches the screenshot: through that relay it is dropped in the screenshot's
    place, the ledger naming the relay, in both forms. With ``relay_overlap: null`` it is kept."""
    photo = photos[9]
    blobs = [jpeg(p) for p in photos[:4]] + [jpeg(photo), jpeg(screenshot_of(photo)), jpeg(small_crop_of(photo), 95)]
    table = stage_table(blobs)
    star = {**EXACT, "grouping": "star"}
    _, direct, _ = run_stage(tmp_path / "direct", table, {**star, "relay_overlap": None})
    assert direct.column("uid").to_pylist() == [uid_of(4)]  # the photo, in the screenshot's place
    (single, d1, l1), (parted, d2, l2) = both_forms(tmp_path / "relay", table, LocalCopyDedupStage, star,
                                                     shard_rows=3, max_partition_rows=3000, map_task_rows=4)
    assert d1.equals(d2) and l1.equals(l2)
    details = {u: json.loads(d) for u, d in zip(d1.column("uid").to_pylist(), d1.column("drop_details").to_pylist())}
    assert set(details) == {uid_of(4, 3), uid_of(6, 3)}
    crop = details[uid_of(6, 3)]
    assert crop["kept_uid"] == uid_of(5, 3) and crop["via_uid"] == uid_of(4, 3) and crop["verified"]
    assert crop["inliers"] >= 12 and crop["via_inliers"] >= 12 and 0.05 < crop["transform"]["scale"] < 1
    assert "via_uid" not in details[uid_of(4, 3)]


def test_features_stored_with_the_older_48_px_thumbnail_still_read(photos):
    """Rows written before the thumbnail grew to 96 px (a resumed run) keep their own side."""
    row = extract([jpeg(photos[0])]).column("local_features")[0].as_py()
    assert from_row(row).thumb.shape == (96, 96)
    new = from_row(row)
    small = cv2.resize(new.thumb, (48, 48), interpolation=cv2.INTER_AREA)
    old = from_row({**row, "thumb": small.tobytes()})
    assert old.thumb.shape == (48, 48)
    identity = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert pixel_agreement(new, old, identity) > 0.7  # each thumbnail mapped at its own side (one side for both: ~0.02)


def smileys(img: Image.Image, spots: list[tuple[float, float, float]]) -> Image.Image:
    """Emoji-like overlays (yellow disc, black outline, eyes, smile) at (x, y, radius) fractions."""
    img = img.copy()
    draw = ImageDraw.Draw(img)
    for fx, fy, fr in spots:
        r, cx, cy = int(min(img.size) * fr), int(img.width * fx), int(img.height * fy)
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=(255, 204, 0), outline=(0, 0, 0), width=max(1, r // 8))
        draw.ellipse((cx - r // 2, cy - r // 3, cx - r // 4, cy - r // 8), fill=(0, 0, 0))
        draw.ellipse((cx + r // 4, cy - r // 3, cx + r // 2, cy - r // 8), fill=(0, 0, 0))
        draw.arc((cx - r // 2, cy - r // 4, cx + r // 2, cy + r // 2), 20, 160, fill=(0, 0, 0), width=max(1, r // 8))
    return img


def test_overlays_disagree_only_where_they_cover(shared_data):
    """Five emoji on a low-texture photo (a hat on floor tiles): their hard edges outweigh the
    photo's detail over the whole overlap (agreement ~0.27, rejected at the defaults), but the
    overlap scored in cells without its worst quarter agrees like a copy (``agreement_trim:
    0.25``; not the default: pages sharing an app frame then agree more often, see below)."""
    photo = Image.open(shared_data / "clothing_cc0" / "hat" / "8f809fea-1f7d-4695-be36-a061bd77c170.jpg").convert("RGB")
    overlaid = smileys(photo, [(0.6, 0.15, 0.1), (0.3, 0.2, 0.08), (0.75, 0.3, 0.12), (0.2, 0.75, 0.1), (0.5, 0.5, 0.11)])
    original, copy = (from_row(r) for r in extract([jpeg(photo), jpeg(overlaid)]).column("local_features").to_pylist())
    whole = verify_pair(copy, original, VerifySettings())
    assert not whole.ok and whole.reason == "pixels_disagree" and whole.inliers >= 12
    trimmed = verify_pair(copy, original, VerifySettings(agreement_trim=0.25))
    assert trimmed.ok and trimmed.agreement > 0.6


def app_frame(img: Image.Image, lines: list[int]) -> Image.Image:
    """A 1280x800 app page: a title bar, the photo 220 px high, grey comment lines."""
    page = Image.new("RGB", (1280, 800), (245, 245, 245))
    draw = ImageDraw.Draw(page)
    draw.rectangle((0, 0, 1280, 56), fill=(60, 90, 160))
    draw.text((10, 8), "My feed", fill=(255, 255, 255))
    for k, y in enumerate(range(640, 780, 28)):
        draw.rectangle((20, y, lines[k % len(lines)], y + 12), fill=(200, 200, 200))
    shot = img.resize((int(img.width * 220 / img.height), 220))
    page.paste(shot, ((1280 - shot.width) // 2, 80))
    return page


def test_a_photo_is_not_relayed_through_a_shared_app_frame(tmp_path, photos):
    """Two pages of one app showing unrelated photos verify on their frame alone (title bar and
    comment lines: a limit of any geometric check, which only recurring-descriptor filtering in
    the candidate search mitigates). The frame's inliers surround the photo (their bounding box
    holds it) without touching it, so the photo shown on the dropped page is not relayed to the
    kept page: it stays."""
    lines = [1150, 900, 1100]
    blobs = [jpeg(app_frame(photos[2], lines)), jpeg(app_frame(photos[3], lines)), jpeg(photos[3])]
    blobs += [jpeg(p) for p in photos[4:8]]
    _, drops, _ = run_stage(tmp_path, stage_table(blobs), {**EXACT, "grouping": "star", "relay_overlap": 0.5})
    details = {u: json.loads(d) for u, d in zip(drops.column("uid").to_pylist(), drops.column("drop_details").to_pylist())}
    assert details.get(uid_of(1), {}).get("kept_uid") == uid_of(0)  # the frames verify
    assert uid_of(2) not in details  # the photo is not relayed through them
