"""Trainer data: manifest streaming, partitioning over processes and workers, resume, folders.

Also holds the helpers the other trainer tests import: ``write_manifest`` (a manifest the way
the pipeline writes it) and ``tiny_config`` (a CPU-sized model and crops).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from curation.train.augment import MultiCrop, batch_masks, block_mask
from curation.train.config import TrainConfig
from curation.train.data import (
    Manifest,
    ManifestStream,
    MultiCropCollate,
    batches_before,
    build_train_loader,
    list_labelled_images,
    split_labelled,
)


# -- helpers shared by the trainer tests ------------------------------------------------------
def colour_jpeg(seed: int, size=(48, 40), hue: int | None = None) -> bytes:
    """A structured JPEG; ``hue`` 0/1/2 makes the image dominated by red/green/blue."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    arr = np.stack([(xx * rng.uniform(0.5, 3) + yy * rng.uniform(0.5, 3) + rng.uniform(0, 255)) % 256 for _ in range(3)], -1)
    if hue is not None:
        arr = arr * 0.25
        arr[..., hue] = 180 + 0.3 * arr[..., hue]
    buf = io.BytesIO()
    Image.fromarray(np.clip(arr, 0, 255).astype("uint8")).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_manifest(out: Path, images: list[bytes], rows_per_shard: int = 8, row_group_size: int = 4) -> Path:
    """OUT/manifest.json plus OUT/dataset/part-*.parquet with the pipeline's columns."""
    (out / "dataset").mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(images), rows_per_shard)):
        chunk = images[start : start + rows_per_shard]
        table = pa.table(
            {
                "id": [hashlib.sha256(b).hexdigest() for b in chunk],
                "bytes": pa.array(chunk, pa.binary()),
                "width": pa.array([48] * len(chunk), pa.int32()),
                "height": pa.array([40] * len(chunk), pa.int32()),
                "source": ["test"] * len(chunk),
                "source_key": [f"img{start + i}" for i in range(len(chunk))],
                "role": ["pool"] * len(chunk),
                "seed_dataset": pa.array([None] * len(chunk), pa.string()),
                "label": pa.array([None] * len(chunk), pa.string()),
            }
        )
        rel = f"dataset/part-{s:05d}.parquet"
        pq.write_table(table, out / rel, row_group_size=row_group_size)
        shards.append({"path": rel, "rows": len(chunk), "sha256": hashlib.sha256((out / rel).read_bytes()).hexdigest()})
    manifest = {"format": "curation.manifest/1", "shards": shards, "counts": {"kept": len(images)}, "config": {}, "seeds": {}}
    path = out / "manifest.json"
    path.write_text(json.dumps(manifest))
    return path


def tiny_config(**overrides) -> TrainConfig:
    cfg = {
        "model": {"arch": "custom", "embed_dim": 48, "depth": 2, "num_heads": 3, "patch_size": 8, "drop_path_rate": 0.2},
        "head": {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
        "crops": {"global_size": 32, "local_size": 16, "n_local": 2},
        "optim": {"epochs": 2, "iters_per_epoch": 4, "batch_size": 4, "warmup_epochs": 0.5, "base_lr": 0.05},
        "loss": {"warmup_teacher_temp_epochs": 1},
        "data": {"num_workers": 0, "shuffle_buffer": 4},
        "log_every": 1,
        "checkpoint_every": 2,
    }
    for dotted, value in overrides.items():
        node = cfg
        *path, last = dotted.split("__")
        for key in path:
            node = node.setdefault(key, {})
        node[last] = value
    return TrainConfig.model_validate(cfg)


@pytest.fixture
def manifest_path(tmp_path) -> Path:
    return write_manifest(tmp_path / "out", [colour_jpeg(i) for i in range(20)])


def _stream(manifest_path, **kw) -> ManifestStream:
    return ManifestStream(Manifest(manifest_path), MultiCrop(32, 16, 2), batch_size=2, **kw)


def _rows(stream, n) -> list[int]:
    it = iter(stream)
    return [next(it)["row"] for _ in range(n)]


# -- manifest streaming -----------------------------------------------------------------------
def test_manifest_units_follow_parquet_row_groups(manifest_path):
    m = Manifest(manifest_path)
    assert m.total_rows == 20
    assert [u.rows for u in m.units] == [4, 4, 4, 4, 4]  # shards of 8, 8, 4 in row groups of 4
    assert [u.first_row for u in m.units] == [0, 4, 8, 12, 16]


def test_each_epoch_yields_every_row_once_in_a_new_order(manifest_path):
    rows = _rows(_stream(manifest_path, shuffle_buffer=5), 40)
    first, second = rows[:20], rows[20:]
    assert sorted(first) == list(range(20)) and sorted(second) == list(range(20))
    assert first != second and first != sorted(first)


def test_processes_and_workers_partition_the_rows(manifest_path):
    # 2 processes x 2 workers = 4 slots over 5 row groups (whole units per slot)
    seen = []
    for rank in range(2):
        loader = torch.utils.data.DataLoader(
            _stream(manifest_path, rank=rank, world_size=2), batch_size=None, num_workers=2
        )
        it = iter(loader)
        seen.append({next(it)["row"] for _ in range(8)})
        del it
    assert not seen[0] & seen[1]


def test_fewer_row_groups_than_slots_strides_rows(tmp_path):
    path = write_manifest(tmp_path / "o", [colour_jpeg(i) for i in range(6)], rows_per_shard=6, row_group_size=6)
    a = _rows(_stream(path, rank=0, world_size=2), 3)
    b = _rows(_stream(path, rank=1, world_size=2), 3)
    assert sorted(a + b) == list(range(6))


def test_resumed_stream_continues_where_it_stopped(manifest_path):
    full = _rows(_stream(manifest_path), 30)
    resumed = _rows(_stream(manifest_path, start_batch=11), 8)  # 11 batches of 2 = 22 samples
    assert resumed == full[22:30]
    assert batches_before(7, 3, 0) == 3 and batches_before(7, 3, 1) == 2 and batches_before(7, 3, 2) == 2


def test_samples_do_not_depend_on_the_reader(manifest_path):
    a = next(iter(_stream(manifest_path)))
    b = next(iter(_stream(manifest_path, start_batch=0)))
    assert a["row"] == b["row"] and torch.equal(a["global"][0], b["global"][0])


def test_sha256_is_verified_when_asked(manifest_path):
    Manifest(manifest_path, verify_sha256=True)
    data = json.loads(manifest_path.read_text())
    data["shards"][0]["sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="sha256"):
        Manifest(manifest_path, verify_sha256=True)


def test_manifest_with_wrong_format_or_rows_is_refused(manifest_path):
    data = json.loads(manifest_path.read_text())
    data["shards"][0]["rows"] = 99
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="rows"):
        Manifest(manifest_path)
    data["format"] = "other/1"
    manifest_path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format"):
        Manifest(manifest_path)


def test_undecodable_row_keeps_its_position_with_a_warning(tmp_path):
    path = write_manifest(tmp_path / "o", [colour_jpeg(0), b"\xff\xd8\xffnot really a jpeg", colour_jpeg(2)])
    with pytest.warns(UserWarning, match="grey image"):
        rows = _rows(_stream(path), 3)
    assert sorted(rows) == [0, 1, 2]


# -- augmentation and batches -----------------------------------------------------------------
def test_multicrop_shapes_and_seed_determinism():
    img = Image.open(io.BytesIO(colour_jpeg(3, size=(80, 64))))
    aug = MultiCrop(32, 16, n_local=3)
    g, l = aug(img, seed=5)
    assert [t.shape for t in g] == [(3, 32, 32)] * 2 and [t.shape for t in l] == [(3, 16, 16)] * 3
    g2, _ = aug(img, seed=5)
    g3, _ = aug(img, seed=6)
    assert torch.equal(g[0], g2[0]) and not torch.equal(g[0], g3[0])


def test_block_masks_cover_the_requested_share():
    rng = np.random.default_rng(0)
    for n in (1, 5, 20, 36):
        assert block_mask(6, n, rng).sum() == n
    masks = batch_masks(8, 4, (0.1, 0.5), 0.5, rng)
    assert masks.shape == (8, 16) and masks.dtype == torch.bool
    assert (masks.sum(1) > 0).sum() == 4  # half the crops masked, ratios within 10-50 %
    assert masks.sum(1).max() <= 8


def test_loader_batches_are_crop_major_with_masks(manifest_path):
    cfg = tiny_config()
    batch = next(iter(build_train_loader(cfg, Manifest(manifest_path), 0, 1, 0, 32)))
    assert batch["global_crops"].shape == (8, 3, 32, 32)
    assert batch["local_crops"].shape == (8, 3, 16, 16)
    assert batch["masks"].shape == (8, 16) and batch["rows"].shape == (4,)
    collate = MultiCropCollate(4, (0.1, 0.5), 0.5)
    sample = {"global": [torch.full((3, 32, 32), float(c)) for c in range(2)], "local": [], "row": 0, "seed": 1}
    stacked = collate([sample, dict(sample, row=1)])
    assert stacked["global_crops"][:2].eq(0).all() and stacked["global_crops"][2:].eq(1).all()


# -- labelled folders -------------------------------------------------------------------------
def test_labelled_folder_split_is_deterministic_and_per_class(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(10):
            (tmp_path / c / f"{i}.jpg").write_bytes(colour_jpeg(i))
    items = list_labelled_images(tmp_path)
    train, test = split_labelled(items, 0.2)
    assert len(test) == 4 and len(train) == 16
    assert {label for _, label in test} == {"a", "b"}
    assert not {p for p, _ in train} & {p for p, _ in test}
    assert split_labelled(items, 0.2) == (train, test)


def test_real_caltech_split(shared_data):
    items = list_labelled_images(shared_data / "pool_caltech101")
    train, test = split_labelled(items, 0.2)
    assert len(items) == 3000 and len(test) == 600
