"""The face_blur stage on real photos: faces found and blurred, everything else left alone."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image
from pydantic import ValidationError

from curation import schema
from curation.imaging import decode_rgb
from curation.safety.blur import enlarge_box
from curation.safety.faces import FaceDetector
from curation.stage import StageContext
from curation.stages.face_blur import FACE_BOXES, FACE_PROBS, FACES, STAGE, Config

PORTRAITS = ("angelina_jolie", "kate_siegel", "paul_rudd", "shea_whigham")
# Object classes of Caltech-101 without people in them.
OBJECT_CLASSES = (
    "accordion airplanes anchor barrel bonsai camera cannon car_side ceiling_fan cellphone chair "
    "chandelier cup electric_guitar ewer ferry gramophone grand_piano headphone helicopter lamp "
    "laptop metronome minaret pagoda pizza scissors stapler strawberry sunflower"
).split()


def make_stage(tmp_path: Path, **config):
    stage = STAGE(Config(**config), StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s"))
    stage.setup()
    return stage


def batch_of(blobs, roles=None) -> pa.Table:
    roles = roles or [schema.POOL] * len(blobs)
    return pa.table({schema.UID: pa.array(range(len(blobs)), pa.int64()), schema.ROLE: roles, schema.BYTES: pa.array(blobs, pa.binary())})


def grey(data: bytes) -> np.ndarray:
    return np.asarray(decode_rgb(data), np.float32).mean(-1)


def texture(a: np.ndarray) -> float:
    return float(np.abs(np.diff(a, axis=0)).mean() + np.abs(np.diff(a, axis=1)).mean())


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two shared CPU cores: OpenMP threads spinning against other processes cost 5x here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def faces_dir(shared_data) -> Path:
    return shared_data / "faces"


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return make_stage(tmp_path_factory.mktemp("face_blur"))


@pytest.fixture(scope="module")
def face_photos(faces_dir) -> list[bytes]:
    """multiface, the four portraits and the five aligned crops."""
    paths = [faces_dir / "multiface.jpg"]
    paths += [faces_dir / "test_images" / p / "1.jpg" for p in PORTRAITS]
    paths += sorted((faces_dir / "test_images_aligned").glob("*/1.png"))
    assert len(paths) == 10
    return [p.read_bytes() for p in paths]


@pytest.fixture(scope="module")
def blurred(stage, face_photos) -> list[dict]:
    return stage.process(batch_of(face_photos)).to_pylist()


def assert_blurred(original: bytes, row: dict, boxes, min_change: float = 20, max_texture: float = 0.25) -> None:
    """Every box lost its detail; outside the enlarged boxes only re-encoding noise remains."""
    before, after = grey(original), grey(row[schema.BYTES])
    assert before.shape == after.shape
    h, w = before.shape
    outside = np.ones(before.shape, bool)
    for box in boxes:
        x1, y1, x2, y2 = (int(v) for v in box)
        face_before, face_after = before[y1:y2, x1:x2], after[y1:y2, x1:x2]
        assert np.abs(face_before - face_after).mean() > min_change
        assert texture(face_after) < max_texture * texture(face_before)
        ex1, ey1, ex2, ey2 = enlarge_box(box, 0.2, (w, h))
        outside[ey1:ey2, ex1:ex2] = False
    diff = np.abs(before - after)[outside]
    assert diff.mean() < 2.0 and np.percentile(diff, 99) < 8


def test_six_faces_in_the_group_photo_are_found_and_blurred(face_photos, blurred):
    row = blurred[0]
    assert row[FACES] == 6 and len(row[FACE_BOXES]) == 6 and len(row[FACE_PROBS]) == 6
    assert all(p >= 0.9 for p in row[FACE_PROBS])
    boxes = np.array(row[FACE_BOXES])
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 2] <= 1200).all() and (boxes[:, 3] <= 630).all()
    sides = np.minimum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    assert (sides > 50).all() and (sides < 150).all()  # face-sized boxes in a 1200x630 photo
    assert row[schema.FORMAT] == "JPEG" and row[schema.BYTES][:3] == b"\xff\xd8\xff"
    assert row[schema.DROP_REASON] is None
    assert_blurred(face_photos[0], row, row[FACE_BOXES])


def test_each_portrait_has_its_face_blurred(face_photos, blurred):
    for original, row in zip(face_photos[1:5], blurred[1:5]):
        assert row[FACES] >= 1
        boxes = np.array(row[FACE_BOXES])
        w, h = decode_rgb(original).size
        areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        assert areas.max() > 0.02 * w * h  # the portrait's face, not a speck
        assert_blurred(original, row, boxes[[areas.argmax()]])
        assert decode_rgb(row[schema.BYTES]).size == (w, h)


def test_aligned_crops_are_blurred_and_stay_png(blurred):
    for row in blurred[5:]:
        assert row[FACES] == 1 and row[schema.FORMAT] == "PNG"
        assert row[schema.BYTES][:8] == b"\x89PNG\r\n\x1a\n"


def test_no_face_above_the_threshold_remains_after_blurring(stage, blurred):
    assert all(r[FACES] >= 1 for r in blurred)
    found = stage._detector.detect([decode_rgb(r[schema.BYTES]) for r in blurred])
    assert [len(f) for f in found] == [0] * len(blurred)


def test_pixelation_also_leaves_no_detectable_face(tmp_path, stage, face_photos):
    # The group photo and the aligned crops (the large portraits add time, not coverage).
    photos = [face_photos[0]] + face_photos[5:]
    rows = make_stage(tmp_path, method="pixelate").process(batch_of(photos)).to_pylist()
    assert [r[FACES] for r in rows] == [6, 1, 1, 1, 1, 1]
    assert_blurred(photos[0], rows[0], rows[0][FACE_BOXES], min_change=15, max_texture=0.5)  # block edges keep some gradient
    found = stage._detector.detect([decode_rgb(r[schema.BYTES]) for r in rows])
    assert [len(f) for f in found] == [0] * len(rows)


def test_object_photos_pass_with_their_original_bytes(shared_data, stage):
    paths = [sorted((shared_data / "pool_caltech101" / c).glob("*.jpg"))[0] for c in OBJECT_CLASSES]
    blobs = [p.read_bytes() for p in paths]
    rows = stage.process(batch_of(blobs)).to_pylist()
    unchanged = [r[FACES] == 0 for r in rows]
    assert sum(unchanged) >= 27, [str(p) for p, u in zip(paths, unchanged) if not u]
    for blob, row in zip(blobs, rows):
        if row[FACES] == 0:
            assert row[schema.BYTES] == blob and row[FACE_BOXES] == [] and row[FACE_PROBS] == []
        assert row[schema.DROP_REASON] is None


def test_boxes_are_in_upright_coordinates_of_an_exif_rotated_photo(faces_dir, stage, blurred):
    upright = Image.open(faces_dir / "multiface.jpg")
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    row = stage.process(batch_of([buf.getvalue()])).to_pylist()[0]
    assert row[FACES] == 6
    out = Image.open(io.BytesIO(row[schema.BYTES]))
    assert out.size == upright.size and out.getexif().get(0x0112) is None
    ours = sorted(tuple(b) for b in row[FACE_BOXES])
    reference = sorted(tuple(b) for b in blurred[0][FACE_BOXES])
    np.testing.assert_allclose(ours, reference, atol=12)


def test_downscaled_detection_boxes_are_scaled_back(faces_dir):
    img = decode_rgb((faces_dir / "test_images" / "kate_siegel" / "1.jpg").read_bytes())
    small = FaceDetector(detect_max_side=512).detect([img])[0]
    full = FaceDetector(detect_max_side=None).detect([img])[0]
    assert len(small) == len(full) == 1
    a, b = small.boxes[0], full.boxes[0]
    inter = max(0, min(a[2], b[2]) - max(a[0], b[0])) * max(0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    assert inter / union > 0.8


def test_images_sharing_a_detection_size_get_their_own_boxes(faces_dir):
    small = decode_rgb((faces_dir / "multiface.jpg").read_bytes())
    large = small.resize((1400, 735), Image.BILINEAR)
    # Both become 600x315 detection copies and go through MTCNN as one batch.
    found = FaceDetector(detect_max_side=600).detect([small, large])
    assert len(found[0]) == len(found[1]) == 6
    a = np.array(sorted(map(tuple, found[0].boxes))) * (1400 / 1200)
    b = np.array(sorted(map(tuple, found[1].boxes)))
    np.testing.assert_allclose(a, b, atol=8)


def test_faces_below_the_minimum_size_are_left_alone(tmp_path, face_photos):
    rows = make_stage(tmp_path, min_face_size=200).process(batch_of(face_photos[:1])).to_pylist()
    assert rows[0][FACES] == 0 and rows[0][schema.BYTES] == face_photos[0]


def test_exclude_rows_pass_and_undecodable_rows_drop(stage, face_photos):
    blobs = [face_photos[5], face_photos[6][:3000], b"\x89PNG\r\n\x1a\n garbage"]
    rows = stage.process(batch_of(blobs, [schema.EXCLUDE, schema.POOL, schema.SEED])).to_pylist()
    assert rows[0][schema.BYTES] == face_photos[5] and rows[0][FACES] is None and rows[0][schema.DROP_REASON] is None
    for row in rows[1:]:
        assert row[schema.DROP_REASON] in ("truncated", "corrupt") and "error" in json.loads(row[schema.DROP_DETAILS])


def test_output_schema_matches_what_process_returns(stage, face_photos):
    out = stage.process(batch_of(face_photos[5:7]))
    for field in stage.output_schema():
        assert out.schema.field(field.name).type == field.type
    assert schema.WIDTH not in out.column_names and schema.HEIGHT not in out.column_names


def test_config_rejects_impossible_values():
    with pytest.raises(ValidationError):
        Config(prob_threshold=1.5)
    with pytest.raises(ValidationError):
        Config(method="swirl")
    assert STAGE(Config(), StageContext(run_dir=Path("."), stage_dir=Path("s"))).manifest_section()["applied"] is True


@pytest.mark.parametrize("name", ["n04204347_shopping_cart.JPEG", "n04336792_stretcher.JPEG"])
def test_faces_revealed_by_blurring_are_blurred_too(stage, shared_data, name):
    """In these photos MTCNN finds a further face only once the strongest ones are blurred
    (found by re-running the detector on a full run's output); the stage looks again until
    nothing is left, so the emitted image has no face above the threshold."""
    data = (shared_data / "seeds_imagenet" / name).read_bytes()
    (row,) = stage.process(batch_of([data])).to_pylist()
    first_pass = stage._detector.detect([decode_rgb(data)])[0]
    assert row["drop_reason"] is None
    assert row["faces"] > len(first_pass)
    assert len(stage._detector.detect([decode_rgb(row["bytes"])])[0]) == 0


def test_an_image_whose_faces_survive_every_round_is_dropped(tmp_path, shared_data):
    one_round = make_stage(tmp_path, max_rounds=1)
    data = (shared_data / "seeds_imagenet" / "n04204347_shopping_cart.JPEG").read_bytes()
    (row,) = one_round.process(batch_of([data])).to_pylist()
    assert row["drop_reason"] == "faces_remain"
    assert json.loads(row["drop_details"])["rounds"] == 1


def test_detection_does_not_depend_on_the_rest_of_the_batch(stage, shared_data):
    """A larger photo that is downscaled to the same detection size must not change the
    pyramid used for this one (the stage's re-check and any later check must agree)."""
    img = decode_rgb((shared_data / "seeds_imagenet" / "n03538406_horse_cart.JPEG").read_bytes())
    big = img.resize((img.width * 2, img.height * 2))
    alone = stage._detector.detect([img])[0]
    together = stage._detector.detect([big, img])[1]
    assert len(alone) == 1
    assert together.probs.tolist() == alone.probs.tolist()
    assert together.boxes.tolist() == alone.boxes.tolist()


def stock_mtcnn_faces(img: Image.Image, min_face_size: int = 20, threshold: float = 0.9) -> list[tuple[list, float]]:
    """facenet-pytorch's own MTCNN at full resolution, as a user would call it."""
    from facenet_pytorch import MTCNN

    boxes, probs = MTCNN(keep_all=True, post_process=False, min_face_size=min_face_size).detect(img)
    if boxes is None:
        return []
    return [(list(map(float, b)), float(p)) for b, p in zip(boxes, probs) if p >= threshold and max(b[2] - b[0], b[3] - b[1]) >= min_face_size]


def test_a_face_a_full_resolution_detector_finds_is_blurred(stage, shared_data):
    """In this 702x1094 seed photo MTCNN finds a 32x47 face at p = 0.91 at full resolution; the
    stage used to detect on a 1024-px copy (0.94x), found nothing there, and emitted the face."""
    data = (shared_data / "seeds_imagenet" / "n03759954_microphone.JPEG").read_bytes()
    img = decode_rgb(data)
    assert img.size == (702, 1094)
    ((box, p),) = stock_mtcnn_faces(img)
    assert 0.9 <= p < 0.92 and 30 <= box[2] - box[0] <= 36 and 44 <= box[3] - box[1] <= 50
    (row,) = stage.process(batch_of([data])).to_pylist()
    assert row[FACES] >= 1 and row[schema.DROP_REASON] is None
    assert_blurred(data, row, [box], min_change=5)
    assert stock_mtcnn_faces(decode_rgb(row[schema.BYTES])) == []


def test_exact_pooling_gives_the_stock_detector_results(face_photos):
    import torch
    from facenet_pytorch import MTCNN

    from curation.safety.faces import CeilMaxPool2d

    g = torch.Generator().manual_seed(0)
    for shape, k, s in [((1, 10, 179, 239), 2, 2), ((3, 10, 180, 240), 2, 2), ((7, 28, 22, 22), 3, 2), ((5, 32, 23, 47), 3, 2), ((2, 64, 9, 9), 2, 2)]:
        x = torch.randn(*shape, generator=g)
        assert torch.equal(CeilMaxPool2d(k, s)(x), torch.nn.functional.max_pool2d(x, k, s, ceil_mode=True))
    ours = FaceDetector().mtcnn  # MTCNN with the exact pooling swapped in
    ours.min_face_size = 20
    stock = MTCNN(keep_all=True, select_largest=False, post_process=False, min_face_size=20)
    for data in face_photos[:5]:
        img = decode_rgb(data)
        (boxes, probs), (expected_boxes, expected_probs) = ours.detect(img), stock.detect(img)
        np.testing.assert_array_equal(probs, expected_probs)
        np.testing.assert_array_equal(boxes, expected_boxes)


def test_with_a_detection_cap_the_face_is_found_on_a_small_decode_and_blurred_at_full_size(tmp_path, face_photos):
    capped = make_stage(tmp_path, detect_max_side=512)
    portrait = face_photos[2]  # kate_siegel, larger than 1024 px
    w, h = decode_rgb(portrait).size
    img, size = capped._detection_image(portrait)
    assert size == (w, h) and max(img.size) < max(w, h) and min(img.size) >= min(capped._detector.copy_size(size))
    (row,) = capped.process(batch_of([portrait])).to_pylist()
    assert row[FACES] >= 1 and decode_rgb(row[schema.BYTES]).size == (w, h)
    boxes = np.array(row[FACE_BOXES])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    assert_blurred(portrait, row, boxes[[areas.argmax()]])
