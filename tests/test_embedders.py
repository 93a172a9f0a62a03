"""Embedders (timm, SSCD, pixels), checkpoint loading and the embed stage on real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import timm
import torch
from PIL import Image

from curation.imaging import decode_rgb
from curation.stage import StageContext, StageError
from curation.stages.embed import STAGE as EMBED, EmbedConfig
from embedders import TRAINER_FORMAT, EmbedderUnavailable, build_embedder, output_dim

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny models on a shared CPU: extra intra-op threads only add contention."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TINY = {"type": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 32}


def rgb(seed, size=(48, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


# -- pixels -----------------------------------------------------------------------------------
def test_pixels_descriptor_is_the_mean_centred_unit_thumbnail():
    img = Image.new("L", (2, 2))
    img.putpixel((1, 0), 255)
    img.putpixel((1, 1), 255)
    e = build_embedder({"type": "pixels", "size": 2}).embed([img.convert("RGB")])
    np.testing.assert_allclose(e[0], [-0.5, 0.5, -0.5, 0.5], atol=1e-6)


def test_pixels_rgb_dimension_and_brightness_invariance():
    emb = build_embedder({"type": "pixels", "size": 16, "grayscale": False})
    assert emb.dim == output_dim({"type": "pixels", "size": 16, "grayscale": False}) == 768
    img = rgb(0)
    brighter = Image.fromarray(np.clip(np.asarray(img, np.int16) + 10, 0, 255).astype(np.uint8))
    a, b = emb.embed([img, brighter])
    assert float(a @ b) > 0.99


# -- timm -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny():
    return build_embedder(TINY, batch_size=2)


def test_timm_embeddings_are_unit_rows_independent_of_batching(tiny):
    emb = tiny
    assert emb.dim == output_dim(TINY) == 192
    assert emb.data_config["input_size"] == (3, 32, 32)
    images = [rgb(i, size=(30 + 7 * i, 50)) for i in range(5)]
    together = emb.embed(images)
    alone = np.concatenate([emb.embed([im]) for im in images])
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(together, alone, atol=1e-4)


def test_a_random_initialisation_is_the_same_in_every_worker():
    from embedders.timm_model import build_timm_model

    torch.manual_seed(123)
    expected_draw = torch.rand(1)
    torch.manual_seed(123)  # whatever state the process is in
    a, _ = build_timm_model("vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 32})
    assert torch.equal(torch.rand(1), expected_draw)  # the caller's generator is left alone
    b, _ = build_timm_model("vit_tiny_patch16_224", pretrained=False, model_kwargs={"img_size": 32})
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_missing_pretrained_weights_say_where_to_get_them():
    with pytest.raises(EmbedderUnavailable) as e:
        build_embedder({"type": "timm", "name": "vit_small_patch14_dinov2.lvd142m"})
    msg = str(e.value)
    assert "timm/vit_small_patch14_dinov2.lvd142m" in msg and "huggingface-cli download" in msg and "checkpoint:" in msg


def features(model, x):
    with torch.inference_mode():
        return torch.nn.functional.normalize(model(x), dim=1).numpy()


def test_trainer_export_loads_without_a_model_name(tmp_path):
    kwargs = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
    model = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, **kwargs).eval()
    path = tmp_path / "export.pt"
    torch.save({"format": TRAINER_FORMAT, "timm_model": "vit_small_patch16_224", "model_kwargs": kwargs, "state_dict": model.state_dict()}, path)
    spec = {"type": "timm", "checkpoint": str(path)}
    assert output_dim(spec) == 64
    emb = build_embedder(spec)
    x = emb.preprocess(rgb(3)).unsqueeze(0)
    np.testing.assert_allclose(emb.embed_preprocessed([x[0]]), features(model, x), atol=1e-5)


def test_plain_and_wrapped_state_dicts_load_into_the_named_architecture(tmp_path):
    model = timm.create_model("resnet10t", pretrained=False).eval()  # with its 1000-class head
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.pth"
    torch.save(model.state_dict(), plain)
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, wrapped)
    model.reset_classifier(0)
    for path in (plain, wrapped):
        emb = build_embedder({"type": "timm", "name": "resnet10t", "checkpoint": str(path), "img_size": 64})
        x = emb.preprocess(rgb(4)).unsqueeze(0)
        np.testing.assert_allclose(emb.embed_preprocessed([x[0]]), features(model, x), atol=1e-5)


def test_mismatched_or_unsafe_checkpoints_are_refused(tmp_path):
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), other)
    with pytest.raises(EmbedderUnavailable, match="does not match"):
        build_embedder({"type": "timm", "name": "resnet14t", "checkpoint": str(other)})
    unsafe = tmp_path / "unsafe.pth"
    torch.save({"state_dict": {}, "hook": Path("/")}, unsafe)  # an arbitrary object: needs full unpickling
    with pytest.raises(EmbedderUnavailable, match="weights_only"):
        build_embedder({"type": "timm", "name": "resnet10t", "checkpoint": str(unsafe)})


# -- sscd -------------------------------------------------------------------------------------
def test_sscd_missing_file_names_the_release_and_the_place(tmp_path, monkeypatch):
    monkeypatch.setenv("CURATION_MODELS", str(tmp_path))
    with pytest.raises(EmbedderUnavailable) as e:
        build_embedder({"type": "sscd"})
    msg = str(e.value)
    assert "https://github.com/facebookresearch/sscd-copy-detection" in msg
    assert "sscd_disc_mixup.torchscript.pt" in msg and str(tmp_path) in msg


class _TinyDescriptor(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, dim, 3)

    def forward(self, x):
        return self.conv(x).mean(dim=(2, 3))


def test_sscd_torchscript_resizes_short_side_and_checks_dim(tmp_path):
    path = tmp_path / "sscd_test.torchscript.pt"
    torch.jit.script(_TinyDescriptor(16).eval()).save(str(path))
    emb = build_embedder({"type": "sscd", "path": str(path), "dim": 16})
    assert tuple(emb.preprocess(rgb(0, size=(400, 200))).shape) == (3, 288, 576)
    out = emb.embed([rgb(1, size=(400, 200)), rgb(2, size=(200, 300)), rgb(3, size=(400, 200))])
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1, atol=1e-5)
    with pytest.raises(EmbedderUnavailable, match="dim: 16"):
        build_embedder({"type": "sscd", "path": str(path)})  # default dim 512


# -- the embed stage --------------------------------------------------------------------------
def ctx(tmp_path):
    return StageContext(run_dir=tmp_path, stage_dir=tmp_path / "s", cluster_cpus=2)


def test_embed_stage_on_real_images_matches_direct_embedding_and_drops_corrupt(shared_data, tmp_path):
    files = sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[:11]
    truncated = files[0].read_bytes()[:3000]
    blobs = [f.read_bytes() for f in files[:5]] + [truncated, b"not an image"] + [f.read_bytes() for f in files[5:]]
    cfg = EmbedConfig.model_validate({"kind": "embed", "model": TINY, "batch_size": 4, "prefetch": 1, "decode_threads": 2})
    stage = EMBED(cfg, ctx(tmp_path))
    assert stage.output_schema().field("embedding").type == pa.list_(pa.float16(), 192)
    assert stage.preflight() == []
    stage.setup()
    out = stage.process(pa.table({"uid": pa.array(range(len(blobs)), pa.int64()), "bytes": blobs}))

    reasons = out.column("drop_reason").to_pylist()
    assert reasons[5] == "truncated" and reasons[6] == "not_image"
    assert [r for i, r in enumerate(reasons) if i not in (5, 6)] == [None] * 11
    emb = out.column("embedding")
    assert emb.null_count == 2
    got = np.array([v for v in emb.to_pylist() if v is not None], np.float32)
    # JPEGs are decoded no larger than the preprocessing needs (here 2 x 71 px on the short side)
    scaled = [decode_rgb(f.read_bytes(), min_size=stage.embedder.decode_min_size) for f in files]
    assert any(im.size != Image.open(f).size for im, f in zip(scaled, files))
    np.testing.assert_allclose(got, stage.embedder.embed(scaled), atol=2e-3)  # float16 storage
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=2e-3)


def test_embed_stage_preflight_stops_a_run_without_weights(tmp_path):
    stage = EMBED(EmbedConfig(kind="embed"), ctx(tmp_path))  # default: ViT-H/14 I-JEPA, not cached here
    with pytest.raises(StageError, match="vit_huge_patch14_gap_224.in22k_ijepa"):
        stage.preflight()


def test_embed_stage_resources_use_cpu_workers_without_gpu(tmp_path):
    stage = EMBED(EmbedConfig(kind="embed", model=TINY, rows_per_call=256), StageContext(run_dir=tmp_path, stage_dir=tmp_path, cluster_cpus=8))
    res = stage.resources()
    if torch.cuda.is_available():
        assert res.num_gpus == 1
    else:
        assert (res.num_gpus, res.num_cpus, res.concurrency, res.batch_size) == (0, 4, (1, 2), 256)
