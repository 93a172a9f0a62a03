"""The nsfw stage: weights handling, threshold logic, ledger reasons, pluggable backends.

The published Open-NSFW weights cannot be downloaded here, so the weights files are written
from opennsfw2's own architecture in the same legacy Keras HDF5 format as the published file,
and loaded through the stage's real loading code. A file whose final layer is set to say "NSFW"
(or "safe") with certainty proves that the loaded weights, not an initialisation, are scored.
"""

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
from curation.safety import nsfw as nsfw_lib
from curation.safety.opennsfw2_backend import OpenNsfw2Backend
from curation.stage import StageContext, StageError
from curation.stages.nsfw import NSFW_SCORE, STAGE, Config


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Two shared CPU cores: OpenMP threads spinning against other processes cost 5x here."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_opennsfw2_weights(path: Path, final_bias: tuple[float, float] | None = None) -> Path:
    """An Open-NSFW weights file in the published (legacy Keras HDF5) format.

    ``final_bias``: zero the last layer's kernel and set its bias, so that every image gets the
    same (safe, nsfw) logits; None keeps the random initialisation.
    """
    import h5py
    import opennsfw2
    from keras.src.legacy.saving.legacy_h5_format import save_weights_to_hdf5_group

    model = opennsfw2.make_open_nsfw_model(weights_path=None)
    if final_bias is not None:
        fc = model.get_layer("fc_nsfw")
        kernel, _ = fc.get_weights()
        fc.set_weights([np.zeros_like(kernel), np.array(final_bias, np.float32)])
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        save_weights_to_hdf5_group(f, model)
    return path


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory) -> dict[str, Path]:
    """Three weights files: random, certainly-NSFW and certainly-safe final layers."""
    out = tmp_path_factory.mktemp("nsfw_weights")
    biases = {"random": None, "nsfw": (0.0, 12.0), "safe": (12.0, 0.0)}
    return {name: write_opennsfw2_weights(out / name / "open_nsfw_weights.h5", b) for name, b in biases.items()}


def make_stage(tmp_path: Path, allow_missing: bool = False, **config):
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", allow_missing_weights=allow_missing)
    return STAGE(Config(**config), ctx)


def batch_of(blobs, roles=None) -> pa.Table:
    roles = roles or [schema.POOL] * len(blobs)
    return pa.table({schema.UID: pa.array(range(len(blobs)), pa.int64()), schema.ROLE: roles, schema.BYTES: pa.array(blobs, pa.binary())})


@pytest.fixture
def images(jpeg_factory):
    return [jpeg_factory(seed, size=(120 + 10 * seed, 90)) for seed in range(3)]


# -- weights location and missing weights ------------------------------------------------------
def test_default_weights_path_is_opennsfw2s_own(monkeypatch, tmp_path):
    from opennsfw2._download import get_default_weights_path

    assert OpenNsfw2Backend.default_weights_path() == Path(get_default_weights_path())
    monkeypatch.setenv("OPENNSFW2_HOME", str(tmp_path))
    assert OpenNsfw2Backend.default_weights_path() == Path(get_default_weights_path())
    assert str(OpenNsfw2Backend.default_weights_path()).startswith(str(tmp_path))


def test_missing_weights_stop_the_run_with_instructions(tmp_path):
    missing = tmp_path / "nowhere" / "open_nsfw_weights.h5"
    stage = make_stage(tmp_path, weights=missing)
    with pytest.raises(StageError) as err:
        stage.preflight()
    msg = str(err.value)
    assert str(missing) in msg
    assert "github.com/bhky/opennsfw2/releases" in msg and "open_nsfw_weights.h5" in msg
    assert str(OpenNsfw2Backend.default_weights_path()) in msg
    assert "weights:" in msg and "enabled: false" in msg and "--allow-missing-weights" in msg
    # A worker started anyway refuses too, rather than scoring nothing silently.
    with pytest.raises(StageError):
        stage.setup()


def test_default_location_is_used_when_no_path_is_configured(tmp_path, monkeypatch, weights_dir):
    monkeypatch.setenv("OPENNSFW2_HOME", str(tmp_path / "home"))
    stage = make_stage(tmp_path)
    with pytest.raises(StageError, match=str(tmp_path / "home" / ".opennsfw2")):
        stage.preflight()
    target = OpenNsfw2Backend.default_weights_path()
    target.parent.mkdir(parents=True)
    target.write_bytes(weights_dir["random"].read_bytes())
    assert stage.preflight() == []
    assert stage.manifest_section()["weights"] == str(target)


def test_an_error_page_saved_as_weights_is_refused(tmp_path):
    bogus = tmp_path / "open_nsfw_weights.h5"
    bogus.write_text("<html>quota exceeded</html>")
    with pytest.raises(StageError, match="not an HDF5 weights file"):
        make_stage(tmp_path, weights=bogus).preflight()


def test_allow_missing_weights_passes_rows_unscored_and_says_so(tmp_path, images):
    stage = make_stage(tmp_path, allow_missing=True, weights=tmp_path / "missing.h5")
    warnings = stage.preflight()
    assert len(warnings) == 1 and "NSFW filtering was NOT applied" in warnings[0]
    section = stage.manifest_section()
    assert section["applied"] is False
    assert section["warning"].startswith("NSFW filtering was NOT applied")
    stage.setup()
    out = stage.process(batch_of(images))
    assert out.num_rows == len(images)
    assert out.column(NSFW_SCORE).null_count == len(images)
    assert out.column(schema.DROP_REASON).null_count == len(images)


# -- scoring with loaded weights ---------------------------------------------------------------
def test_loaded_weights_decide_scores_and_drops(tmp_path, weights_dir, images):
    nsfw = make_stage(tmp_path, weights=weights_dir["nsfw"], threshold=0.8)
    assert nsfw.preflight() == []
    nsfw.setup()
    out = nsfw.process(batch_of(images)).to_pylist()
    assert all(r[NSFW_SCORE] > 0.999 for r in out)
    assert all(r[schema.DROP_REASON] == "nsfw" for r in out)
    details = json.loads(out[0][schema.DROP_DETAILS])
    assert details["threshold"] == 0.8 and details["score"] == pytest.approx(out[0][NSFW_SCORE], abs=1e-6)

    safe = make_stage(tmp_path, weights=weights_dir["safe"], threshold=0.8)
    safe.setup()
    out = safe.process(batch_of(images)).to_pylist()
    assert all(r[NSFW_SCORE] < 0.001 for r in out)
    assert all(r[schema.DROP_REASON] is None and r[schema.DROP_DETAILS] is None for r in out)


def test_threshold_is_inclusive_and_above_one_drops_nothing(tmp_path, weights_dir, images):
    stage = make_stage(tmp_path, weights=weights_dir["random"], threshold=0.0, batch_size=2)
    stage.setup()
    everything = stage.process(batch_of(images))
    scores = everything.column(NSFW_SCORE).to_numpy()
    assert everything.schema.field(NSFW_SCORE).type == pa.float32()
    assert np.all((scores >= 0) & (scores <= 1))
    assert everything.column(schema.DROP_REASON).to_pylist() == ["nsfw"] * len(images)

    stage.config = Config(weights=weights_dir["random"], threshold=1.01)
    nothing = stage.process(batch_of(images))
    assert nothing.column(schema.DROP_REASON).null_count == len(images)
    # Batch size does not change a score.
    np.testing.assert_allclose(nothing.column(NSFW_SCORE).to_numpy(), scores, rtol=1e-5, atol=1e-6)

    cut = float(np.median(scores))
    stage.config = Config(weights=weights_dir["random"], threshold=cut)
    judged = stage.process(batch_of(images))
    # Scores can move by one float32 ulp between batchings, so the drop is
    # checked against the scores of this very pass.
    again = judged.column(NSFW_SCORE).to_numpy()
    reasons = judged.column(schema.DROP_REASON).to_pylist()
    assert reasons == ["nsfw" if s >= cut else None for s in again]
    assert reasons.count("nsfw") >= 1


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_scores_match_opennsfw2s_own_prediction(tmp_path, weights_dir, shared_data):
    import opennsfw2

    path = shared_data / "pool_caltech101" / "pizza" / "image_0001.jpg"
    stage = make_stage(tmp_path, weights=weights_dir["random"])
    stage.setup()
    ours = stage.process(batch_of([path.read_bytes()])).column(NSFW_SCORE)[0].as_py()
    theirs = opennsfw2.predict_image(Image.open(path), weights_path=str(weights_dir["random"]))
    assert ours == pytest.approx(theirs, abs=1e-5)


def test_exclude_rows_pass_and_undecodable_rows_drop_with_decode_reason(tmp_path, weights_dir, images):
    stage = make_stage(tmp_path, weights=weights_dir["safe"])
    stage.setup()
    blobs = [images[0], images[1][: len(images[1]) // 2], b"not an image at all", images[2]]
    out = stage.process(batch_of(blobs, [schema.EXCLUDE, schema.POOL, schema.SEED, schema.SEED])).to_pylist()
    assert out[0][NSFW_SCORE] is None and out[0][schema.DROP_REASON] is None
    assert out[1][schema.DROP_REASON] in ("truncated", "corrupt") and out[1][NSFW_SCORE] is None
    assert out[2][schema.DROP_REASON] == "not_image"
    assert "error" in json.loads(out[2][schema.DROP_DETAILS])
    assert out[3][NSFW_SCORE] is not None and out[3][schema.DROP_REASON] is None


# -- contract ----------------------------------------------------------------------------------
def test_manifest_section_when_applied(tmp_path, weights_dir):
    section = make_stage(tmp_path, weights=weights_dir["random"], threshold=0.7).manifest_section()
    assert section == {
        "applied": True,
        "backend": "opennsfw2",
        "model": OpenNsfw2Backend.description,
        "threshold": 0.7,
        "weights": str(weights_dir["random"]),
    }


def test_resources_ask_for_a_gpu_only_when_there_is_one(tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ctx = StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", cluster_cpus=4, cluster_gpus=0)
    res = STAGE(Config(batch_size=16), ctx).resources()
    assert res.num_gpus == 0 and res.batch_size == 16 and res.concurrency == (1, 4)
    ctx.cluster_gpus = 2
    res = STAGE(Config(), ctx).resources()
    assert res.num_gpus == 1 and res.concurrency == (1, 2)


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValidationError, match="unknown NSFW backend 'clip'.*opennsfw2"):
        Config(backend="clip")


def test_another_backend_plugs_in_by_name(tmp_path, monkeypatch, jpeg_factory):
    """A classifier that calls bright images NSFW, registered under its own name."""

    class BrightnessBackend(nsfw_lib.NsfwBackend):
        name = "brightness"
        description = "mean brightness"

        @classmethod
        def default_weights_path(cls) -> Path:
            return tmp_path / "brightness.weights"

        @classmethod
        def download_hint(cls) -> str:
            return "write any file"

        def __init__(self, weights: Path, device: str):
            self.scale = float(weights.read_text())

        def preprocess(self, image):
            return np.asarray(image, np.float32)[:8, :8].mean(keepdims=True)

        def predict(self, batch):
            return (batch.reshape(len(batch)) / self.scale).astype(np.float32)

    monkeypatch.setattr(nsfw_lib, "_BACKENDS", dict(nsfw_lib._BACKENDS))
    nsfw_lib.register_backend(BrightnessBackend)
    with pytest.raises(StageError, match="write any file"):
        make_stage(tmp_path, backend="brightness").preflight()
    BrightnessBackend.default_weights_path().write_text("255")

    def solid(v):
        buf = io.BytesIO()
        Image.new("RGB", (16, 16), (v, v, v)).save(buf, "PNG")
        return buf.getvalue()

    stage = make_stage(tmp_path, backend="brightness", threshold=0.5)
    stage.setup()
    out = stage.process(batch_of([solid(250), solid(10)]))
    assert out.column(schema.DROP_REASON).to_pylist() == ["nsfw", None]
    assert stage.manifest_section()["backend"] == "brightness"
