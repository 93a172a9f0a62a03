"""Two training processes on CPU with gloo: data split by rank, gradients averaged, one writer."""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from curation.train.checkpoint import load_checkpoint
from curation.train.trainer import Trainer
from tests.test_train_data import colour_jpeg, tiny_config, write_manifest


@pytest.fixture
def manifest_path(tmp_path):
    return write_manifest(tmp_path / "out", [colour_jpeg(i) for i in range(16)])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from curation.train.data import build_train_loader

    trainer = Trainer(tiny_config(max_iters=2), manifest, out)
    rows = next(iter(build_train_loader(trainer.cfg, trainer.manifest, rank, world, 0, 32)))["rows"].tolist()
    trainer.fit()
    digest = float(sum(p.double().sum() for p in trainer.teacher.state_dict().values()))
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({"rows": rows, "teacher_digest": digest, "iteration": trainer.iteration}, f)
    dist.destroy_process_group()


def test_two_processes_with_gloo_train_in_sync(tmp_path, manifest_path):
    out = tmp_path / "ddp"
    out.mkdir()
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(manifest_path), str(out)), nprocs=2, join=True)
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["iteration"] == r1["iteration"] == 2
    assert not set(r0["rows"]) & set(r1["rows"])  # each process reads its own images
    assert r0["teacher_digest"] == pytest.approx(r1["teacher_digest"], rel=1e-9)  # gradients were averaged
    assert load_checkpoint(out)["iteration"] == 2  # only rank 0 writes checkpoints
