"""FSDP2 on CPU: two processes over gloo shard student, teacher and optimizer, train like DDP,
save sharded checkpoints (torch.distributed.checkpoint) that resume exactly, and still export the
consolidated teacher."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import timm
import torch
import torch.multiprocessing as mp

from curation.train.checkpoint import load_checkpoint
from curation.train.export import export_checkpoint
from curation.train.trainer import Trainer
from tests.test_train_data import colour_jpeg, tiny_config, write_manifest
from tests.test_train_distributed import _free_port


@pytest.fixture
def manifest_path(tmp_path):
    return write_manifest(tmp_path / "out", [colour_jpeg(i) for i in range(16)])


def _log(run: str) -> list[dict]:
    with open(os.path.join(run, "train_log.jsonl")) as f:
        return [json.loads(line) for line in f]


def _fsdp_worker(rank: int, world: int, port: int, manifest: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from curation.train.distributed import local

    report: dict = {}
    Trainer(tiny_config(max_iters=2), manifest, os.path.join(out, "ddp")).fit()

    fsdp = tiny_config(max_iters=3, strategy="fsdp")  # checkpoints at 2 and 3
    a = Trainer(fsdp, manifest, os.path.join(out, "a"))
    a.fit()
    params = list(a.student.parameters())
    report["all_sharded"] = all(isinstance(p, DTensor) for p in params)
    report["local_numel"] = sum(local(p).numel() for p in params)
    report["full_numel"] = sum(p.numel() for p in params)
    report["optimizer_state_numel"] = sum(local(s["exp_avg"]).numel() for s in a.optimizer.state.values())

    # resume a copy of the run from its checkpoint of iteration 2
    if rank == 0:
        src, dst = os.path.join(out, "a", "checkpoints"), os.path.join(out, "b", "checkpoints")
        os.makedirs(dst)
        shutil.copy(os.path.join(src, "ckpt-00000002.pt"), os.path.join(dst, "last.pt"))
        shutil.copytree(os.path.join(src, "sharded-00000002"), os.path.join(dst, "sharded-00000002"))
    dist.barrier()
    b = Trainer(fsdp, manifest, os.path.join(out, "b"))
    b.fit()
    report["resumed_iteration"] = b.iteration
    report["exp_avg_equal"] = all(
        torch.allclose(local(sa["exp_avg"]), local(sb["exp_avg"]), rtol=1e-5, atol=1e-7)
        for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values())
    )

    # bf16 all-gathers and reductions over gloo, fp32 master weights
    mixed = Trainer(tiny_config(max_iters=1, strategy="fsdp", fsdp__cpu_mixed_precision=True), manifest, os.path.join(out, "bf16"))
    dtypes = []
    mixed.student.backbone.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: dtypes.append(str(o.dtype)))
    report["bf16_loss"] = mixed.fit()["last"]["loss"]
    report["bf16_compute_dtypes"] = sorted(set(dtypes))
    report["bf16_master_dtypes"] = sorted({str(p.dtype) for p in mixed.student.parameters()})
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def test_fsdp_shards_trains_like_ddp_and_resumes_exactly(tmp_path, manifest_path):
    out = tmp_path / "runs"
    out.mkdir()
    mp.spawn(_fsdp_worker, args=(2, _free_port(), str(manifest_path), str(out)), nprocs=2, join=True)
    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for r in reports:
        assert r["all_sharded"] and r["local_numel"] < 0.6 * r["full_numel"]  # each process holds about half
        assert r["optimizer_state_numel"] == r["local_numel"]  # AdamW state is sharded alike

    # the same two steps as DDP, to float rounding (reduce-scatter vs all-reduce)
    ddp, fsdp = (load_checkpoint(out / run / "checkpoints" / "ckpt-00000002.pt") for run in ("ddp", "a"))
    assert fsdp["strategy"] == "fsdp" and fsdp["sharded"] == "sharded-00000002"
    assert (out / "a" / "checkpoints" / "sharded-00000002" / ".metadata").is_file()
    assert len(list((out / "a" / "checkpoints" / "sharded-00000002").glob("*.distcp"))) == 2  # one file per process
    assert ddp["teacher"].keys() == fsdp["teacher"].keys()
    for name, value in ddp["teacher"].items():
        torch.testing.assert_close(fsdp["teacher"][name], value, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in _log(out / "a")[:2]]), torch.tensor([r["loss"] for r in _log(out / "ddp")]), rtol=1e-5, atol=0
    )

    # resumed from the sharded checkpoint of iteration 2: the same third step
    assert all(r["resumed_iteration"] == 3 and r["exp_avg_equal"] for r in reports)
    log_a, log_b = _log(out / "a"), _log(out / "b")
    assert log_b[0]["iteration"] == 3 and log_b[0]["loss"] == pytest.approx(log_a[2]["loss"], rel=1e-6)
    a3, b3 = load_checkpoint(out / "a"), load_checkpoint(out / "b")
    for name, value in a3["teacher"].items():
        torch.testing.assert_close(b3["teacher"][name], value, rtol=1e-6, atol=1e-7)

    # the consolidated teacher exports as under DDP and loads into timm
    payload = torch.load(export_checkpoint(out / "a", tmp_path / "vit.pt"), weights_only=True)
    model = timm.create_model(payload["timm_model"], pretrained=False, **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"], strict=True)

    for r in reports:
        assert r["bf16_loss"] == r["bf16_loss"]  # finite
        assert r["bf16_compute_dtypes"] == ["torch.bfloat16"] and r["bf16_master_dtypes"] == ["torch.float32"]


def test_fsdp_in_one_process_distils_from_a_sharded_frozen_teacher(tmp_path, manifest_path):
    """One process gets a process group of one; the frozen (exported, timm) teacher is sharded too."""
    from torch.distributed.tensor import DTensor

    Trainer(tiny_config(model__embed_dim=96, model__depth=3, model__num_heads=3), manifest_path, tmp_path / "teacher").save()
    export = export_checkpoint(tmp_path / "teacher", tmp_path / "teacher.pt")
    trainer = Trainer(tiny_config(max_iters=2, strategy="fsdp", distill__teacher=str(export)), manifest_path, tmp_path / "s")
    try:
        assert all(isinstance(p, DTensor) for p in trainer.frozen_teacher.parameters())
        assert trainer.fit()["iteration"] == 2
        assert load_checkpoint(tmp_path / "s")["sharded"] == "sharded-00000002"
    finally:
        trainer.close()
    import torch.distributed as dist

    assert not dist.is_initialized()
