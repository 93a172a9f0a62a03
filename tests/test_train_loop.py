"""Training loop end to end on CPU: steps, resume, two processes, export to timm, evaluation, CLI."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch

from curation.train.checkpoint import load_checkpoint
from curation.train.cli import main as cli_main
from curation.train.evaluate import knn_accuracy, load_backbone
from curation.train.export import export_checkpoint, load_exported
from curation.train.trainer import Trainer
from tests.test_train_data import colour_jpeg, tiny_config, write_manifest


@pytest.fixture
def manifest_path(tmp_path):
    return write_manifest(tmp_path / "out", [colour_jpeg(i) for i in range(16)])


def _params(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def test_training_steps_then_resume_reproduces_the_next_step(tmp_path, manifest_path):
    cfg = tiny_config(max_iters=3)
    first = Trainer(cfg, manifest_path, tmp_path / "a", )
    summary = first.fit()
    assert summary["iteration"] == 3
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2, 3]
    assert all(r["loss"] == r["loss"] and r["ibot"] >= 0 and "koleo" in r for r in log)
    assert log[0]["last_layer_lr"] == 0  # prototypes frozen during the first epoch

    # a second run directory that holds only the checkpoint of iteration 2
    (tmp_path / "b" / "checkpoints").mkdir(parents=True)
    shutil.copy(tmp_path / "a" / "checkpoints" / "ckpt-00000002.pt", tmp_path / "b" / "checkpoints" / "last.pt")
    resumed = Trainer(cfg, manifest_path, tmp_path / "b")
    resumed.fit()
    assert resumed.iteration == 3
    log_b = [json.loads(line) for line in (tmp_path / "b" / "train_log.jsonl").read_text().splitlines()]
    assert log_b[0]["iteration"] == 3 and log_b[0]["loss"] == pytest.approx(log[2]["loss"], rel=1e-5)
    for name, value in first.teacher.state_dict().items():
        torch.testing.assert_close(resumed.teacher.state_dict()[name], value, rtol=1e-5, atol=1e-6)
    opt_a, opt_b = first.optimizer.state_dict(), resumed.optimizer.state_dict()
    torch.testing.assert_close(opt_b["state"][0]["exp_avg"], opt_a["state"][0]["exp_avg"], rtol=1e-5, atol=1e-7)


def test_checkpoint_loads_with_weights_only(tmp_path, manifest_path):
    Trainer(tiny_config(max_iters=1, loss__teacher_norm="centering"), manifest_path, tmp_path / "r").fit()
    state = load_checkpoint(tmp_path / "r")
    assert state["iteration"] == 1 and state["data"]["batches_per_rank"] == 1
    assert state["targets"]["dino"]["centering.center"].abs().sum() > 0  # centring ran and is saved


def _log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]


def test_high_resolution_final_phase_switches_mid_run_and_resumes_across_the_switch(tmp_path, manifest_path):
    # 4 iterations, the last 2 at 48/24 px crops instead of 32/16 (position embeddings interpolated)
    cfg = tiny_config(optim__epochs=1, optim__iters_per_epoch=4, checkpoint_every=1, hires__global_size=48, hires__local_size=24, hires__epochs=0.5)
    full = Trainer(cfg, manifest_path, tmp_path / "full")
    assert [full.crop_sizes_at(i) for i in range(4)] == [(32, 16)] * 2 + [(48, 24)] * 2
    full.fit()
    log = _log(tmp_path / "full")
    assert [r["global_size"] for r in log] == [32, 32, 48, 48]
    assert full.teacher.backbone.pos_embed.shape[1] == 1 + 4 * 4  # stored at the base grid
    for start in (1, 3):  # before the switch, and inside the high-resolution phase
        run = tmp_path / f"from{start}"
        (run / "checkpoints").mkdir(parents=True)
        shutil.copy(tmp_path / "full" / "checkpoints" / f"ckpt-{start:08d}.pt", run / "checkpoints" / "last.pt")
        resumed = Trainer(cfg, manifest_path, run)
        resumed.fit()
        assert [(r["iteration"], r["global_size"]) for r in _log(run)] == [(r["iteration"], r["global_size"]) for r in log[start:]]
        for a, b in zip(_log(run), log[start:]):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        for name, value in full.teacher.state_dict().items():
            torch.testing.assert_close(resumed.teacher.state_dict()[name], value, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kernel", ["by_size", "jagged"])
def test_packed_and_math_attention_training_runs(tmp_path, manifest_path, kernel):
    cfg = tiny_config(max_iters=1, model__packing=True, model__packed_attention=kernel, model__attention="math", model__skip_drop_compute=False)
    assert Trainer(cfg, manifest_path, tmp_path / "p").fit()["iteration"] == 1


def test_bad_crop_size_for_patch_is_explained(tmp_path, manifest_path):
    with pytest.raises(ValueError, match="use 14 or 21"):
        Trainer(tiny_config(model__patch_size=7, crops__local_size=16, crops__global_size=28), manifest_path, tmp_path / "x")


# -- export and evaluation --------------------------------------------------------------------
def test_export_loads_into_timm_strict_and_matches_the_teacher(tmp_path, manifest_path):
    trainer = Trainer(tiny_config(max_iters=1), manifest_path, tmp_path / "r")
    trainer.fit()
    path = export_checkpoint(tmp_path / "r", tmp_path / "vit.pt")
    payload = torch.load(path, weights_only=True)
    assert payload["format"] == "curation.vit/1"
    model = timm.create_model(payload["timm_model"], pretrained=False, **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"], strict=True)
    x = torch.randn(2, 3, 32, 32)
    ours = trainer.teacher.backbone.eval()(x)
    torch.testing.assert_close(model.eval()(x), ours, rtol=1e-5, atol=1e-5)
    assert load_exported(path)(torch.randn(1, 3, 48, 48)).shape == (1, 48)  # other sizes interpolate
    # the pipeline's embedders load the same file as a retrieval model
    embedders = pytest.importorskip("embedders.timm_model")
    embedder_model, _ = embedders.build_timm_model(None, pretrained=False, checkpoint=path)
    torch.testing.assert_close(embedder_model(x), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch,patch,name", [("vit_small", 14, "vit_small_patch14_dinov2"), ("vit_base", 16, "vit_base_patch16_224"), ("vit_giant", 14, "vit_giant_patch14_224")])
def test_export_names_a_plain_registered_timm_vit(arch, patch, name):
    from curation.train.export import timm_arch_name

    assert timm_arch_name(arch, patch) == name


def test_knn_vote_is_weighted_by_similarity():
    train = torch.nn.functional.normalize(torch.tensor([[1.0, 0], [0.9, 0.1], [0, 1.0]]), dim=1)
    labels = torch.tensor([0, 0, 1])
    test = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05], [0.05, 1.0]]), dim=1)
    result = knn_accuracy(train, labels, test, torch.tensor([0, 1]), n_classes=2, k=3)
    assert result["top1"] == 1.0


@pytest.fixture
def colour_folder(tmp_path):
    root = tmp_path / "labelled"
    for hue, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(8):
            (root / name / f"{i}.jpg").write_bytes(colour_jpeg(100 * hue + i, hue=hue))
    return root


def test_cli_train_export_and_eval(tmp_path, manifest_path, colour_folder, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.json"
    # without LayerScale a barely trained ViT's class token already depends on the image content
    cfg.write_text(tiny_config(model__layerscale=None).model_dump_json())
    assert cli_main(["train", "--manifest", str(manifest_path), "--output", str(run), "--config", str(cfg), "--max-iters", "1"]) == 0
    assert cli_main(["export", "--checkpoint", str(run), "--output", str(tmp_path / "vit.pt")]) == 0
    capsys.readouterr()
    assert cli_main(["eval", "knn", "--checkpoint", str(tmp_path / "vit.pt"), "--data", str(colour_folder), "--k", "5", "--json", str(tmp_path / "knn.json")]) == 0
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["knn"]["n_test"] == 6 and knn["knn"]["top1"] > knn["chance"] + 0.3  # three separable colours
    assert cli_main(["eval", "linear", "--checkpoint", str(run), "--random-init", "--data", str(colour_folder), "--epochs", "20", "--json", str(tmp_path / "lin.json")]) == 0
    assert json.loads((tmp_path / "lin.json").read_text())["linear"]["top1"] > 1 / 3
    assert cli_main(["eval", "pca", "--checkpoint", str(run), "--images", str(colour_folder / "red"), "--output", str(tmp_path / "pca"), "--size", "64"]) == 0
    pngs = sorted((tmp_path / "pca").glob("*.png"))
    assert len(pngs) == 8
    from PIL import Image

    with Image.open(pngs[0]) as im:
        assert im.size == (128, 64)


def test_load_backbone_from_training_checkpoint(tmp_path, manifest_path):
    Trainer(tiny_config(max_iters=1), manifest_path, tmp_path / "r").fit()
    backbone = load_backbone(tmp_path / "r" / "checkpoints" / "last.pt")
    cls, patches = backbone.features(torch.randn(1, 3, 32, 32))
    assert cls.shape == (1, 48) and patches.shape == (1, 16, 48)


def test_add_subcommands_registers_commands():
    import argparse

    parser = argparse.ArgumentParser()
    from curation.train.cli import add_subcommands

    add_subcommands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "pca", "--checkpoint", "x", "--images", "a.jpg", "--output", "o"])
    assert callable(args.func)
    args = parser.parse_args(["train", "--manifest", "m.json", "--output", "o", "--set", "model.patch_size=8"])
    assert args.set == ["model.patch_size=8"] and callable(args.func)
