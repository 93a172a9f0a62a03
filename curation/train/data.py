"""Training data: the curated manifest streamed shard by shard, and labelled image folders.

The manifest's Parquet shards are never loaded whole: each DataLoader worker of each process
reads its share (whole row groups when there are enough of them, otherwise every n-th row),
shuffles through a bounded buffer and decodes in the worker. The stream is infinite and a pure
function of (seed, epoch, process, worker), so a resumed run skips the rows it already used
(reading Parquet, not decoding) and continues with the same samples and the same crops.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info
from torchvision import transforms as T

from curation.imaging import DecodeError, decode_rgb
from curation.train.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCrop, batch_masks

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "curation.manifest/1"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"}


# -- manifest ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    path: Path
    rows: int
    sha256: str | None


@dataclass(frozen=True)
class Unit:
    """One Parquet row group: the smallest piece of a shard a worker reads."""

    shard: int
    row_group: int
    rows: int
    first_row: int  # global index of its first row over the whole manifest


class Manifest:
    def __init__(self, path: str | Path, verify_sha256: bool = False):
        self.path = Path(path)
        data = json.loads(self.path.read_text())
        if data.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"{self.path}: format {data.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        root = self.path.parent
        self.shards = [Shard(root / s["path"], int(s["rows"]), s.get("sha256")) for s in data["shards"]]
        self.info = data
        if verify_sha256:
            for s in self.shards:
                verify_shard(s)
        self.units = self._units()
        self.total_rows = sum(u.rows for u in self.units)
        if self.total_rows == 0:
            raise ValueError(f"{self.path}: the manifest lists no rows")

    def _units(self) -> list[Unit]:
        units, first = [], 0
        for i, s in enumerate(self.shards):
            md = pq.ParquetFile(s.path).metadata
            if md.num_rows != s.rows:
                raise ValueError(f"{s.path}: {md.num_rows} rows, the manifest says {s.rows}")
            for rg in range(md.num_row_groups):
                n = md.row_group(rg).num_rows
                units.append(Unit(i, rg, n, first))
                first += n
        return units


def image_column(pf: pq.ParquetFile) -> str:
    """``image`` (struct of bytes and path, column contract curation.dataset/1) or, in
    datasets written before it, ``bytes``."""
    return "image" if "image" in pf.schema_arrow.names else "bytes"


def verify_shard(shard: Shard) -> None:
    if not shard.sha256:
        raise ValueError(f"{shard.path}: no sha256 in the manifest to verify against")
    h = hashlib.sha256()
    with open(shard.path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != shard.sha256:
        raise ValueError(f"{shard.path}: sha256 {h.hexdigest()} does not match the manifest ({shard.sha256})")


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one sample's augmentation, independent of who reads it."""
    return int(np.random.SeedSequence([seed, epoch, row]).generate_state(1, dtype=np.uint64)[0] >> 1)


def batches_before(position: int, n_workers: int, worker: int) -> int:
    """Batches worker ``worker`` delivered among the first ``position`` batches (round-robin)."""
    return position // n_workers + (1 if worker < position % n_workers else 0)


class ManifestStream(IterableDataset):
    """Infinite stream of multi-crop samples for one process, split over its workers."""

    def __init__(
        self,
        manifest: Manifest,
        transform: MultiCrop,
        batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_batch: int = 0,
        shuffle_buffer: int = 256,
    ):
        self.manifest, self.transform, self.batch_size = manifest, transform, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.start_batch, self.shuffle_buffer = start_batch, shuffle_buffer

    def _slot(self) -> tuple[int, int, int, int]:
        info = get_worker_info()
        n_workers, worker = (info.num_workers, info.id) if info else (1, 0)
        return self.rank * n_workers + worker, self.world_size * n_workers, n_workers, worker

    def _plan(self, epoch: int, slot: int, n_slots: int) -> tuple[list[Unit], bool]:
        """Units this slot reads in ``epoch`` and whether it keeps every n-th row of them."""
        units = self.manifest.units
        order = np.random.default_rng([self.seed, epoch]).permutation(len(units))
        if len(units) >= n_slots:
            return [units[i] for i in order[slot::n_slots]], False
        return [units[i] for i in order], True

    def _epoch_length(self, epoch: int, slot: int, n_slots: int) -> int:
        units, strided = self._plan(epoch, slot, n_slots)
        if not strided:
            return sum(u.rows for u in units)
        return sum(len(range((slot - u.first_row) % n_slots, u.rows, n_slots)) for u in units)

    def _rows(self, epoch: int, slot: int, n_slots: int) -> Iterator[tuple[int, bytes]]:
        """(global row index, image bytes) in this slot's shuffled order for one epoch."""
        units, strided = self._plan(epoch, slot, n_slots)
        rng = np.random.default_rng([self.seed, epoch, slot, 1])
        buffer: list[tuple[int, bytes]] = []
        for u in units:
            pf = pq.ParquetFile(self.manifest.shards[u.shard].path)
            row = u.first_row
            for batch in pf.iter_batches(batch_size=64, row_groups=[u.row_group], columns=[image_column(pf)]):
                col = batch.column(0)
                if pa.types.is_struct(col.type):  # the Hugging Face Image layout: {bytes, path}
                    col = col.field("bytes")
                for i in range(batch.num_rows):
                    if not strided or (row + i) % n_slots == slot:
                        item = (row + i, col[i].as_py())
                        if len(buffer) < self.shuffle_buffer:
                            buffer.append(item)
                        else:
                            j = int(rng.integers(len(buffer)))
                            buffer[j], item = item, buffer[j]
                            yield item
                row += batch.num_rows
        for j in rng.permutation(len(buffer)):
            yield buffer[j]

    def __iter__(self):
        slot, n_slots, n_workers, worker = self._slot()
        if self.manifest.total_rows < n_slots:
            raise ValueError(f"{self.manifest.total_rows} images cannot feed {n_slots} data workers over all processes")
        skip = batches_before(self.start_batch, n_workers, worker) * self.batch_size
        epoch = 0
        while skip >= (n := self._epoch_length(epoch, slot, n_slots)):
            skip, epoch = skip - n, epoch + 1
        while True:
            for row, data in self._rows(epoch, slot, n_slots):
                if skip:
                    skip -= 1
                    continue
                yield self._sample(row, data, epoch)
            epoch += 1

    def _sample(self, row: int, data: bytes, epoch: int) -> dict:
        try:
            img = decode_rgb(data)
        except DecodeError as e:
            # Keep the position exact (a resume skips rows without decoding): a grey stand-in.
            warnings.warn(f"row {row}: {e.reason}: {e}; a grey image stands in for it")
            img = Image.new("RGB", (256, 256), (124, 116, 104))
        seed = sample_seed(self.seed, epoch, row)
        global_crops, local_crops = self.transform(img, seed)
        return {"global": global_crops, "local": local_crops, "row": row, "seed": seed}


class MultiCropCollate:
    """Stacks crops crop-major ((k*B, C, H, W): crop 0 of every image, then crop 1, ...) and
    draws the iBOT masks of the global crops, seeded by the batch's samples."""

    def __init__(self, grid: int, mask_ratio: tuple[float, float], mask_probability: float):
        self.grid, self.mask_ratio, self.mask_probability = grid, mask_ratio, mask_probability

    def __call__(self, samples: list[dict]) -> dict:
        n_global, n_local = len(samples[0]["global"]), len(samples[0]["local"])
        global_crops = torch.stack([s["global"][c] for c in range(n_global) for s in samples])
        local_crops = torch.stack([s["local"][c] for c in range(n_local) for s in samples]) if n_local else None
        rng = np.random.default_rng([s["seed"] for s in samples])
        masks = batch_masks(len(global_crops), self.grid, self.mask_ratio, self.mask_probability, rng)
        return {
            "global_crops": global_crops,
            "local_crops": local_crops,
            "masks": masks,
            "rows": torch.tensor([s["row"] for s in samples], dtype=torch.int64),
        }


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not oversubscribe the trainer's cores


def build_train_loader(
    cfg, manifest: Manifest, rank: int, world_size: int, start_batch: int, global_size: int, local_size: int | None = None
) -> DataLoader:
    c = cfg.crops
    transform = MultiCrop(global_size, local_size or c.local_size, c.n_local, tuple(c.global_scale), tuple(c.local_scale))
    stream = ManifestStream(
        manifest, transform, cfg.optim.batch_size, cfg.seed, rank, world_size, start_batch, cfg.data.shuffle_buffer
    )
    collate = MultiCropCollate(global_size // cfg.model.patch_size, tuple(cfg.loss.mask_ratio), cfg.loss.mask_probability)
    return DataLoader(
        stream,
        batch_size=cfg.optim.batch_size,
        collate_fn=collate,
        num_workers=cfg.data.num_workers,
        worker_init_fn=_worker_init if cfg.data.num_workers else None,
        pin_memory=torch.cuda.is_available(),
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG alone
    )


# -- labelled image folders (evaluation) ------------------------------------------------------
def list_labelled_images(root: str | Path) -> list[tuple[Path, str]]:
    """(path, class) for every image under ``root/<class>/``, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder of class subfolders")
    items = [
        (p, d.name)
        for d in sorted(root.iterdir())
        if d.is_dir()
        for p in sorted(d.rglob("*"))
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not items:
        raise ValueError(f"{root}: no images in class subfolders")
    return items


def split_labelled(items: list[tuple[Path, str]], test_fraction: float = 0.2, seed: int = 0):
    """Deterministic per-class train/test split: the same files on every machine and run.

    Files are ranked by a hash of (seed, class, file name); the first ``test_fraction`` of each
    class (at least one when the class has two or more images) are the test split.
    """
    by_class: dict[str, list[Path]] = {}
    for p, label in items:
        by_class.setdefault(label, []).append(p)
    train, test = [], []
    for label, paths in sorted(by_class.items()):
        ranked = sorted(paths, key=lambda p: hashlib.sha1(f"{seed}/{label}/{p.name}".encode()).hexdigest())
        n_test = max(1, round(len(ranked) * test_fraction)) if len(ranked) > 1 else 0
        test += [(p, label) for p in ranked[:n_test]]
        train += [(p, label) for p in ranked[n_test:]]
    return train, test


def eval_transform(size: int) -> T.Compose:
    return T.Compose(
        [
            T.Resize(int(round(size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
            T.CenterCrop(size),
            T.ToTensor(),
            T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


class LabelledImages(Dataset):
    def __init__(self, items: list[tuple[Path, str]], classes: list[str], size: int):
        self.items, self.index = items, {c: i for i, c in enumerate(classes)}
        self.transform = eval_transform(size)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[i]
        try:
            img = decode_rgb(path.read_bytes())
        except DecodeError as e:
            raise DecodeError(e.reason, f"{path}: {e}") from None
        return self.transform(img), self.index[label]
