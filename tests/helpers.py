"""Small builders for test inputs (copies of real images, never links: readers refuse links
that leave their root)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq

# Pipeline YAML (str.format-ready) for decode and a tiny random-init ViT: real embeddings for
# retrieval tests at the least cost.
TINY_EMBED_STAGES = """  - kind: decode
    min_side: 32
  - kind: embed
    model: {{type: timm, name: vit_tiny_patch16_224, pretrained: false, img_size: 32}}
    batch_size: 32
    rows_per_call: 128
    cpus_per_worker: 1
"""


def copy_images(src_dir: Path, dst_dir: Path, per_class: int, classes: list[str] | None = None) -> list[Path]:
    out = []
    class_dirs = sorted(p for p in src_dir.iterdir() if p.is_dir())
    if classes is not None:
        class_dirs = [d for d in class_dirs if d.name in classes]
    for d in class_dirs:
        target = dst_dir / d.name
        target.mkdir(parents=True, exist_ok=True)
        for f in sorted(p for p in d.iterdir() if p.is_file())[:per_class]:
            shutil.copyfile(f, target / f.name)
            out.append(target / f.name)
    return out


def dataset_rows(run_dir: Path, columns=("uid", "id", "source_key")) -> list[tuple]:
    rows = []
    for p in sorted((run_dir / "dataset").glob("*.parquet")):
        t = pq.read_table(p, columns=list(columns))
        rows += list(zip(*[t.column(c).to_pylist() for c in columns]))
    return sorted(rows)


def stage_values(run_dir: Path, stage: str, column: str) -> dict[int, object]:
    """uid -> ``column`` as stage ``stage`` wrote it (stage columns stay out of the dataset)."""
    out = {}
    for p in sorted((run_dir / "stages").glob(f"*_{stage}/part-*.parquet")):
        t = pq.read_table(p, columns=["uid", column])
        out.update(zip(t.column("uid").to_pylist(), t.column(column).to_pylist()))
    return out


def ledger_rows(run_dir: Path) -> list[tuple]:
    rows = []
    for p in sorted((run_dir / "ledger").rglob("*.parquet")):
        t = pq.read_table(p)
        rows += list(zip(*[t.column(c).to_pylist() for c in ("uid", "id", "stage", "decision", "reason", "details")]))
    return sorted(rows)


def manifest(run_dir: Path) -> dict:
    return json.loads((run_dir / "manifest.json").read_text())
