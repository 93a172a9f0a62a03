"""``curation.open_run(RUN)``: a finished run's dataset as a Ray Dataset, a Hugging Face Dataset
or a plain torch iterable of ``(image, metadata)``, read from the shards its manifest lists.

Not tied to the trainer (``curation.train`` reads the same shards with multi-crop augmentation):
this is for looking at, filtering or feeding the curated images to anything else.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import pyarrow.parquet as pq
import torch.utils.data

from curation.contract import CONTRACT, IMAGE


class RunDataset:
    """The dataset of one run directory. ``shards`` are the Parquet files of the manifest."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        path = self.run_dir / "manifest.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist: {self.run_dir} is not a finished run (see `curate status --run {self.run_dir}`)")
        self.manifest = json.loads(path.read_text())
        contract = (self.manifest.get("dataset") or {}).get("contract")
        if contract != CONTRACT:
            raise ValueError(f"{self.run_dir}: dataset contract {contract!r}, this version reads {CONTRACT!r}")
        self.shards = [self.run_dir / s["path"] for s in self.manifest["shards"]]
        if not self.shards:
            raise ValueError(f"{self.run_dir}: no Parquet shards (emit.formats {self.manifest['dataset']['formats']}); read the tars with webdataset")

    def __len__(self) -> int:
        return sum(int(s["rows"]) for s in self.manifest["shards"])

    def ray(self):
        """A Ray Dataset over the shards (the image column is the ``{bytes, path}`` struct)."""
        import ray.data

        return ray.data.read_parquet([str(p) for p in self.shards])

    def hf(self):
        """A Hugging Face ``datasets.Dataset``; ``image`` decodes to PIL images."""
        from datasets import load_dataset

        return load_dataset("parquet", data_files=[str(p) for p in self.shards], split="train")

    def torch(self, decode: bool = True, columns: list[str] | None = None) -> "ImageIterable":
        """``(PIL image, metadata)`` pairs; see ``ImageIterable``."""
        return ImageIterable(self.shards, decode, columns)


class ImageIterable(torch.utils.data.IterableDataset):
    """``(image, metadata)`` for every row, as a ``torch.utils.data.IterableDataset``: each
    DataLoader worker reads its own share of the Parquet row groups. ``image`` is a PIL image in
    RGB (``decode=False``: the stored bytes); ``metadata`` holds the other columns (or
    ``columns``)."""

    def __init__(self, shards: list[Path], decode: bool = True, columns: list[str] | None = None):
        self.shards, self.decode, self.columns = list(shards), decode, columns

    def _units(self) -> list[tuple[Path, int]]:
        return [(p, g) for p in self.shards for g in range(pq.ParquetFile(p).metadata.num_row_groups)]

    def __iter__(self) -> Iterator[tuple[Any, dict]]:
        info = torch.utils.data.get_worker_info()
        units = self._units()
        if info is not None:
            units = units[info.id :: info.num_workers]
        to_image: Callable[[bytes], Any] = _decode if self.decode else (lambda b: b)
        for path, group in units:
            pf = pq.ParquetFile(path)
            cols = None if self.columns is None else list(dict.fromkeys([IMAGE, *self.columns]))
            for row in pf.read_row_group(group, columns=cols).to_pylist():
                image = row.pop(IMAGE)
                yield to_image(image["bytes"]), row


def _decode(data: bytes):
    from curation.imaging import decode_rgb

    return decode_rgb(data)


def open_run(run_dir: str | Path, as_: Literal["torch", "hf", "ray"] | None = None, **kwargs):
    """The run's dataset: ``as_="torch"`` (``(PIL image, metadata)`` pairs), ``"hf"`` or
    ``"ray"``; without ``as_``, a ``RunDataset`` offering all three."""
    ds = RunDataset(run_dir)
    if as_ is None:
        return ds
    if as_ not in ("torch", "hf", "ray"):
        raise ValueError(f"as_={as_!r}: expected torch, hf or ray")
    return getattr(ds, as_)(**kwargs)
