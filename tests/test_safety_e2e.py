"""`curate run` with the safety stages on real photos, through a local Ray.

The emitted dataset must hold no face the detector still finds, keep face-free images
byte-for-byte, drop NSFW images with their reason, and say loudly when NSFW filtering was not
applied.
"""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from curation.config import PipelineConfig
from curation.imaging import decode_rgb
from curation.runner import RunRequest, run_pipeline
from curation.safety.faces import FaceDetector
from curation.stage import StageError
from tests.helpers import ledger_rows, manifest, stage_values
from tests.test_safety_nsfw import write_opennsfw2_weights

pytestmark = pytest.mark.slow

OBJECTS = ("accordion", "chair", "pizza", "umbrella")


@pytest.fixture(scope="module")
def pool(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("safety_pool")
    shutil.copyfile(shared_data / "faces" / "multiface.jpg", root / "multiface.jpg")
    shutil.copyfile(shared_data / "faces" / "test_images" / "paul_rudd" / "1.jpg", root / "paul_rudd.jpg")
    for c in OBJECTS:
        first = sorted((shared_data / "pool_caltech101" / c).glob("*.jpg"))[0]
        shutil.copyfile(first, root / f"{c}.jpg")
    return root


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    out = tmp_path_factory.mktemp("weights")
    return {
        "safe": write_opennsfw2_weights(out / "safe" / "open_nsfw_weights.h5", (12.0, 0.0)),
        "nsfw": write_opennsfw2_weights(out / "nsfw" / "open_nsfw_weights.h5", (0.0, 12.0)),
    }


def config(nsfw_weights) -> PipelineConfig:
    return PipelineConfig.model_validate(
        {
            "name": "safety",
            "ingest": {"shard_size": 4},
            "stages": [
                {"kind": "decode", "min_side": 32},
                {"kind": "exact_dedup"},
                {"kind": "nsfw", "weights": str(nsfw_weights), "threshold": 0.8},
                {"kind": "face_blur"},
            ],
            "ray": {"num_cpus": 2, "include_dashboard": False},
        }
    )


def dataset(run_dir) -> dict[str, dict]:
    rows = {}
    for p in sorted((run_dir / "dataset").glob("*.parquet")):
        for r in pq.read_table(p).to_pylist():
            rows[r["source_key"].rsplit("/", 1)[-1]] = r
    return rows


def test_emitted_faces_are_blurred_and_other_images_untouched(tmp_path, pool, weights, ray_local):
    out = tmp_path / "run"
    run_pipeline(RunRequest(pools=[str(pool)], out=out, config=config(weights["safe"]), progress=False))
    rows = dataset(out)
    assert set(rows) == {p.name for p in pool.iterdir()}
    faces, nsfw = stage_values(out, "face_blur", "faces"), stage_values(out, "nsfw", "nsfw_score")
    assert faces[rows["multiface.jpg"]["uid"]] == 6 and faces[rows["paul_rudd.jpg"]["uid"]] >= 1
    found = FaceDetector().detect([decode_rgb(r["image"]["bytes"]) for r in rows.values()])
    assert [len(f) for f in found] == [0] * len(rows)
    for c in OBJECTS:
        assert rows[f"{c}.jpg"]["image"]["bytes"] == (pool / f"{c}.jpg").read_bytes()
        assert nsfw[rows[f"{c}.jpg"]["uid"]] < 0.001
    m = manifest(out)
    assert m["stage_reports"]["nsfw"]["applied"] is True
    assert m["stage_reports"]["face_blur"]["applied"] is True
    assert not any("NSFW" in w for w in m["warnings"])


def test_nsfw_drops_are_in_the_ledger_with_score_and_threshold(tmp_path, pool, weights, ray_local):
    out = tmp_path / "run"
    run_pipeline(RunRequest(pools=[str(pool)], out=out, config=config(weights["nsfw"]), progress=False))
    assert dataset(out) == {}
    drops = [r for r in ledger_rows(out) if r[4] == "nsfw"]
    assert len(drops) == len(list(pool.iterdir()))
    for _uid, _id, stage, decision, _reason, details in drops:
        d = json.loads(details)
        assert stage == "nsfw" and decision == "dropped" and d["threshold"] == 0.8 and d["score"] > 0.999


def test_missing_weights_stop_before_work_unless_allowed(tmp_path, pool, ray_local):
    missing = tmp_path / "nowhere" / "open_nsfw_weights.h5"
    with pytest.raises(StageError, match="--allow-missing-weights"):
        run_pipeline(RunRequest(pools=[str(pool)], out=tmp_path / "refused", config=config(missing), progress=False))
    assert not (tmp_path / "refused" / "stages").exists()

    out = tmp_path / "allowed"
    run_pipeline(RunRequest(pools=[str(pool)], out=out, config=config(missing), allow_missing_weights=True, progress=False))
    m = manifest(out)
    assert m["stage_reports"]["nsfw"]["applied"] is False
    assert any(w.startswith("NSFW filtering was NOT applied") for w in m["warnings"])
    rows = dataset(out)
    assert len(rows) == len(list(pool.iterdir()))
    nsfw = stage_values(out, "nsfw", "nsfw_score")
    assert len(nsfw) == len(rows) and all(v is None for v in nsfw.values())
