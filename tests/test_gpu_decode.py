"""The GPU decode path of the model stages, run on the CPU: the same selection, batching and
fallbacks, with torchvision's CPU JPEG decoder standing in for nvJPEG (``device="cpu"``)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg

from curation.imaging import DecodeError, decode_rgb
from curation.stage import StageContext
from curation.stages.embed import STAGE as EMBED, EmbedConfig
from embedders import build_embedder
from embedders.gpu_decode import BatchJpegDecoder, orient

TINY = {"type": "timm", "name": "vit_tiny_patch16_224", "pretrained": False, "img_size": 64}


def photo(w=320, h=240, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * rng.uniform(0.3, 1.5) + yy * rng.uniform(0.3, 1.5)) % 256 for _ in range(3)], -1)
    return Image.fromarray(np.clip(arr + rng.normal(0, 6, (h, w, 3)), 0, 255).astype(np.uint8))


def encoded(img: Image.Image, fmt="JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}) | kw)
    return buf.getvalue()


def with_orientation(img: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encoded(img, exif=exif)


class SpyDecoder:
    """torchvision's decode_jpeg, counting calls; ``reject`` makes it refuse those bytes as
    nvJPEG refuses what it does not support (the whole batch fails)."""

    def __init__(self, reject: tuple[bytes, ...] = ()):
        self.calls: list[int] = []
        self.reject = {bytes(r) for r in reject}

    def __call__(self, data, mode, device):
        batch = data if isinstance(data, list) else [data]
        self.calls.append(len(batch) if isinstance(data, list) else 0)
        if any(bytes(t.numpy().tobytes()) in self.reject for t in batch):
            raise RuntimeError("nvjpeg: unsupported")
        return decode_jpeg(data, mode=mode, device=device)


@pytest.fixture(scope="module")
def embedder():
    torch.manual_seed(0)
    return build_embedder(TINY, device="cpu")


def make_decoder(embedder, spy=None):
    def cpu_prepare(data):
        try:
            return embedder.preprocess(decode_rgb(data or b"", min_size=embedder.decode_min_size))
        except DecodeError as e:
            return e

    return BatchJpegDecoder(embedder.tensor_preprocess(), "cpu", cpu_prepare, decoder=spy or SpyDecoder())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_on_the_tensor_matches_pillow(orientation):
    data = with_orientation(photo(64, 40), orientation)
    x = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    expected = torch.from_numpy(np.array(decode_rgb(data))).permute(2, 0, 1)
    assert torch.equal(orient(x, orientation), expected)


def test_each_image_takes_the_path_it_can_and_bad_ones_get_their_reasons(embedder):
    good = {
        "baseline": encoded(photo(seed=1)),
        "progressive": encoded(photo(seed=2), progressive=True),
        "grey": encoded(photo(seed=3).convert("L")),
        "rotated": with_orientation(photo(seed=4), 6),
        "cmyk": encoded(photo(seed=5).convert("CMYK")),
        "png": encoded(photo(seed=6), "PNG"),
    }
    whole = encoded(photo(seed=7))
    bad = {
        "truncated": whole[: len(whole) // 2],
        "cut_and_closed": whole[: int(len(whole) * 0.8)] + b"\xff\xd9",
        "garbage": b"not an image at all",
    }
    blobs = list(good.values()) + list(bad.values())
    decoder = make_decoder(embedder)
    prepared = decoder.prepare(blobs)
    items = prepared.wait()
    assert prepared.counts == {
        "device": 4,  # baseline, progressive, grey and EXIF-rotated JPEGs
        "cpu_format": 2,  # CMYK and PNG go to Pillow from the header alone
        "cpu_rejected": 1,  # the decoder refused the cut file; Pillow then names it
        "cpu_grey_tail": 1,  # decoded, but ends in fill: the CPU path confirms the cut
        "dropped": 3,
    }
    for name, data, item in zip(good, good.values(), items):
        reference = embedder.preprocess(decode_rgb(data))
        assert isinstance(item, torch.Tensor) and item.shape == reference.shape, name
        assert cosine(item, reference) > 0.99, name
    reasons = [item.reason for item in items[len(good) :]]
    assert reasons == ["truncated", "truncated", "not_image"]


def test_one_batch_call_per_batch_and_image_by_image_only_when_rejected(embedder):
    blobs = [encoded(photo(seed=i)) for i in range(5)]
    spy = SpyDecoder()
    make_decoder(embedder, spy).prepare(blobs).wait()
    assert spy.calls == [5]

    spy = SpyDecoder(reject=(blobs[2],))  # something nvJPEG does not support, Pillow does
    decoder = make_decoder(embedder, spy)
    prepared = decoder.prepare(blobs)
    items = prepared.wait()
    assert spy.calls == [5, 0, 0, 0, 0, 0]  # the batch, then each image alone
    assert prepared.counts == {"device": 4, "cpu_rejected": 1}
    assert all(isinstance(x, torch.Tensor) for x in items)
    assert cosine(items[2], embedder.preprocess(decode_rgb(blobs[2]))) > 0.99


def test_embed_stage_batch_decoding_gives_the_cpu_path_results(tmp_path, shared_data):
    files = sorted((shared_data / "seeds_imagenet").glob("*.JPEG"))[:10]
    blobs = [f.read_bytes() for f in files]
    blobs[3] = blobs[3][:2000]
    blobs.append(encoded(photo(seed=9), "PNG"))

    def run(gpu_decode):
        cfg = EmbedConfig.model_validate({"kind": "embed", "model": TINY, "batch_size": 4, "decode_threads": 1, "gpu_decode": gpu_decode})
        stage = EMBED(cfg, StageContext(run_dir=tmp_path, stage_dir=tmp_path / gpu_decode))
        torch.manual_seed(0)
        stage.setup()
        out = stage.process(pa.table({"uid": pa.array(range(len(blobs)), pa.int64()), "bytes": pa.array(blobs, pa.binary())}))
        return stage, out

    batched, out = run("always")
    _, reference = run("never")
    assert batched.batch_decoder.counts["device"] == 9 and batched.batch_decoder.counts["cpu_format"] == 1
    assert out.column("drop_reason").to_pylist() == reference.column("drop_reason").to_pylist()
    assert out.column("drop_reason").to_pylist()[3] == "truncated"
    got = [np.array(v, np.float32) for v in out.column("embedding").to_pylist() if v is not None]
    ref = [np.array(v, np.float32) for v in reference.column("embedding").to_pylist() if v is not None]
    assert len(got) == len(ref) == 10
    assert min(float(a @ b) for a, b in zip(got, ref)) > 0.99


def test_auto_uses_the_batch_decoder_only_on_a_gpu(tmp_path):
    cfg = EmbedConfig.model_validate({"kind": "embed", "model": TINY})
    stage = EMBED(cfg, StageContext(run_dir=tmp_path, stage_dir=Path(tmp_path)))
    stage.setup()
    assert (stage.batch_decoder is not None) == torch.cuda.is_available()
