"""Training checkpoints: tensors and primitive values only, so ``weights_only=True`` loads them.

A checkpoint holds the student, the teacher, the optimizer, the teacher-target buffers, the
GradScaler, the next iteration (which is also the data position: batches consumed per process)
and the config. Random numbers need no stored state: every step reseeds from (seed, rank,
iteration) and every sample's augmentation from (seed, epoch, row).

Under FSDP the student, teacher and optimizer are saved sharded with torch.distributed.checkpoint
(``sharded-<iteration>/``, one file per process plus metadata; it loads into any process count),
and ``ckpt-<iteration>.pt`` keeps the rest, the consolidated teacher (for ``curate export`` and
evaluation, as under DDP) and the name of its sharded directory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

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
    # memory-mapped: under FSDP every process reads this file, and the teacher in it may be large
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    return state


def latest_checkpoint(directory: str | Path) -> Path | None:
    last = Path(directory) / LAST
    return last if last.is_file() else None


def sharded_name(iteration: int) -> str:
    return f"sharded-{iteration:08d}"


def save_sharded(state: dict[str, Any], directory: str | Path, iteration: int, is_main: bool) -> str:
    """Every process writes its shards of ``state`` (DTensors) to ``sharded-<iteration>/``.

    Written under a temporary name and renamed by the main process once all have finished, so a
    directory with the final name is always complete. Returns the name (relative to ``directory``).
    """
    import torch.distributed.checkpoint as dcp

    directory = Path(directory)
    name = sharded_name(iteration)
    tmp, final = directory / f"{name}.tmp", directory / name
    if is_main:
        directory.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    dist.barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    dist.barrier()
    return name


def load_sharded(state: dict[str, Any], directory: str | Path, name: str) -> None:
    """Fill ``state`` (DTensors of the current sharding) in place from ``directory/name``."""
    import torch.distributed.checkpoint as dcp

    path = Path(directory) / name
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: the sharded part of this checkpoint is missing or incomplete")
    dcp.load(state, checkpoint_id=str(path))
