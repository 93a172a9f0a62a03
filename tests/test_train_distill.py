"""Distillation (``curate train --distill-from``): a small student against a frozen larger teacher
with the teacher's own heads, an EMA of the student as the model to export."""

from __future__ import annotations

import pytest
import timm
import torch

from curation.train.checkpoint import load_checkpoint
from curation.train.cli import main as cli_main
from curation.train.export import export_checkpoint
from curation.train.trainer import Trainer
from tests.test_train_data import colour_jpeg, tiny_config, write_manifest

TEACHER = {"model__embed_dim": 96, "model__depth": 3, "model__num_heads": 3, "model__layerscale": None}


@pytest.fixture
def manifest_path(tmp_path):
    return write_manifest(tmp_path / "out", [colour_jpeg(i) for i in range(16)])


@pytest.fixture
def teacher_run(tmp_path, manifest_path):
    """A larger tiny ViT's training checkpoint (at initialisation: enough to be a teacher here)."""
    Trainer(tiny_config(**TEACHER), manifest_path, tmp_path / "teacher").save()
    return tmp_path / "teacher"


def test_student_learns_from_a_frozen_exported_teacher_and_its_ema_is_exported(tmp_path, manifest_path, teacher_run):
    export = export_checkpoint(teacher_run, tmp_path / "teacher.pt")  # holds the teacher's heads too
    payload = torch.load(export, weights_only=True)
    run = tmp_path / "student"
    student = Trainer(tiny_config(max_iters=2, distill__teacher=str(export)), manifest_path, run)
    frozen = {k: v.clone() for k, v in student.frozen_teacher.state_dict().items()}
    assert all(b.drop_path == 0 for b in student.student.backbone.blocks)  # no stochastic depth when distilling
    student.fit()

    # the teacher is the exported one, heads included, and did not move
    teacher_state = student.frozen_teacher.state_dict()
    for name, value in payload["state_dict"].items():
        torch.testing.assert_close(teacher_state[f"backbone.model.{name}"], value)
    for name, value in payload["heads"]["dino_head"].items():
        torch.testing.assert_close(teacher_state[f"dino_head.{name}"], value)
    assert all(torch.equal(teacher_state[k], v) for k, v in frozen.items())
    assert not any(p.requires_grad for p in student.frozen_teacher.parameters())

    # iBOT covered every global-crop patch without mask tokens (the paper's distillation)
    assert student.student.backbone.mask_token.grad is None
    log = [r for r in map(__import__("json").loads, (run / "train_log.jsonl").read_text().splitlines())]
    assert [r["iteration"] for r in log] == [1, 2] and all(r["ibot"] > 0 and r["dino"] > 0 for r in log)

    # the checkpoint's teacher is the EMA of the student: that is what export writes
    state = load_checkpoint(run)
    for name, value in student.teacher.state_dict().items():
        torch.testing.assert_close(state["teacher"][name], value)
    assert not torch.equal(state["teacher"]["backbone.blocks.0.attn.qkv.weight"], student.student.state_dict()["backbone.blocks.0.attn.qkv.weight"])
    out = export_checkpoint(run, tmp_path / "student.pt")
    exported = torch.load(out, weights_only=True)
    assert exported["meta"]["distilled_from"] == str(export) and exported["model_kwargs"]["embed_dim"] == 48

    # a resumed distillation run rebuilds the frozen teacher from the config and continues
    more = Trainer(tiny_config(max_iters=3, distill__teacher=str(export)), manifest_path, run)
    assert more.fit()["iteration"] == 3


def test_distill_from_a_training_run_through_the_cli_with_the_teachers_centre(tmp_path, manifest_path):
    maker = Trainer(tiny_config(loss__teacher_norm="centering", **TEACHER), manifest_path, tmp_path / "teacher")
    maker.dino_targets.centering.center.fill_(0.5)  # as if trained
    maker.save()
    cfg = tmp_path / "cfg.json"
    cfg.write_text(tiny_config(loss__teacher_norm="centering").model_dump_json())
    run = tmp_path / "student"
    assert cli_main(["train", "--manifest", str(manifest_path), "--output", str(run), "--config", str(cfg),
                     "--max-iters", "1", "--distill-from", str(tmp_path / "teacher")]) == 0
    state = load_checkpoint(run)
    assert state["config"]["distill"]["teacher"] == str(tmp_path / "teacher")
    center = state["targets"]["dino"]["centering.center"]
    assert center.mean() > 0.9 * 0.5 - 0.2  # one momentum step (0.9) from the teacher's centre, not from 0


def test_distill_from_a_timm_vit_with_random_frozen_heads(tmp_path, manifest_path):
    torch.manual_seed(0)
    weights = tmp_path / "vit_tiny.pt"
    torch.save(timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).state_dict(), weights)
    spec = f"timm:vit_tiny_patch16_224@{weights}"
    # timm's patch 16 against the student's 8: iBOT (patch by patch) cannot work, and says so
    with pytest.raises(ValueError, match="patch size is 16"):
        Trainer(tiny_config(distill__teacher=spec), manifest_path, tmp_path / "x")
    cfg = tiny_config(max_iters=1, distill__teacher=spec, loss__ibot_weight=0)
    trainer = Trainer(cfg, manifest_path, tmp_path / "timm")
    assert trainer.frozen_teacher.backbone.embed_dim == 192 and trainer.fit()["iteration"] == 1


def test_teacher_mismatches_are_explained(tmp_path, manifest_path, teacher_run):
    with pytest.raises(ValueError, match="set head.out_dim=64"):
        Trainer(tiny_config(distill__teacher=str(teacher_run), head__out_dim=32), manifest_path, tmp_path / "k")
    with pytest.raises(FileNotFoundError, match="no distillation teacher"):
        Trainer(tiny_config(distill__teacher=str(tmp_path / "missing.pt")), manifest_path, tmp_path / "m")
    from embedders.base import EmbedderUnavailable

    with pytest.raises(EmbedderUnavailable, match="not available offline"):
        Trainer(tiny_config(distill__teacher="timm:vit_large_patch14_dinov2.lvd142m"), manifest_path, tmp_path / "t")


# -- the student's features move towards the teacher's -----------------------------------------
def neighbour_agreement(a: torch.Tensor, b: torch.Tensor, k: int = 5) -> float:
    """Mean share of each point's k nearest neighbours (cosine) under ``a`` that are also among
    its k nearest under ``b``: 1 for the same neighbourhoods, about k/n for unrelated ones."""
    def knn(f):
        f = torch.nn.functional.normalize(f, dim=1)
        sims = f @ f.t()
        sims.fill_diagonal_(-2.0)
        return sims.topk(k, dim=1).indices

    na, nb = knn(a), knn(b)
    return sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(na, nb)) / (k * len(na))


@pytest.mark.slow
def test_distilled_student_features_move_towards_the_teachers(tmp_path):
    """A larger tiny ViT whose patch embedding sees only luminance edges (the same zero-mean filter
    on every colour channel) is the teacher: its patch neighbourhoods differ from a random ViT's,
    which follow colour. Distilling from it makes the student's patch-token neighbourhoods agree
    more with the teacher's, and less with those of an unrelated random ViT of the teacher's size."""
    import io

    from PIL import Image

    from curation.train.data import eval_transform
    from curation.train.vit import VisionTransformer

    images = [colour_jpeg(i) for i in range(32)]
    manifest = write_manifest(tmp_path / "out", images)
    maker = Trainer(tiny_config(**TEACHER), manifest, tmp_path / "teacher")
    with torch.no_grad():
        w = maker.teacher.backbone.patch_embed.proj.weight
        w.copy_(w.mean(1, keepdim=True).expand_as(w))
        w.sub_(w.mean((2, 3), keepdim=True)).mul_(3.0)
    maker.save()
    iters = 200
    cfg = tiny_config(
        distill__teacher=str(tmp_path / "teacher"), model__layerscale=None, max_iters=iters, optim__epochs=1,
        optim__iters_per_epoch=iters, optim__warmup_epochs=0.1, optim__freeze_last_layer_epochs=0, optim__batch_size=8,
        crops__n_local=0, checkpoint_every=iters, log_every=50,
    )
    student = Trainer(cfg, manifest, tmp_path / "student")
    x = torch.stack([eval_transform(32)(Image.open(io.BytesIO(b)).convert("RGB")) for b in images[:8]])
    torch.manual_seed(123)
    decoy = VisionTransformer(32, 8, 96, 3, 3, layerscale=None).eval()

    @torch.no_grad()
    def patches(backbone) -> torch.Tensor:
        return backbone.eval().forward_features(x)["patches"].reshape(-1, backbone.embed_dim)

    teacher_tokens, decoy_tokens = patches(student.frozen_teacher.backbone), patches(decoy)
    before = neighbour_agreement(teacher_tokens, patches(student.student.backbone))
    decoy_before = neighbour_agreement(decoy_tokens, patches(student.student.backbone))
    student.fit()
    after = neighbour_agreement(teacher_tokens, patches(student.student.backbone))
    decoy_after = neighbour_agreement(decoy_tokens, patches(student.student.backbone))
    assert after > before + 0.08  # measured: 0.27 -> 0.44
    assert decoy_after < decoy_before  # measured: 0.86 -> 0.62: it is the teacher's structure, not any ViT's
