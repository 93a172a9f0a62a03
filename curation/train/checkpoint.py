"""Training checkpoints: tensors and primitive values only, so ``weights_only=True`` loads them.

A checkpoint holds the student, the teacher, the optimizer, the teacher-target buffers, the
GradScaler, the next iteration (which is also the data position: batches consumed per process)
and the config. Random numbers need no stored state: every step reseeds from (seed, rank,
iteration) and every sample's augmentation from (seed, epoch, row).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

CHECKPOINT_FORMAT = "curation.train-checkpoint/1"
LAST = "last.pt"


def save_checkpoint(state: dict[str, Any], directory: str | Path) -> Path:
    """Write ``ckpt-<iteration>.pt`` and ``last.pt`` atomically (temporary name, then rename)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {"format": CHECKPOINT_FORMAT, **state}
    path = directory / f"ckpt-{state['iteration']:08d}.pt"
    for target in (path, directory / LAST):
        tmp = target.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        os.replace(tmp, target)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():  # a run directory or its checkpoints/ folder
        path = path / "checkpoints" / LAST if (path / "checkpoints" / LAST).is_file() else path / LAST
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint (train with `curate train` first)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


def latest_checkpoint(directory: str | Path) -> Path | None:
    last = Path(directory) / LAST
    return last if last.is_file() else None
