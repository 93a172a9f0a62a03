"""``curate export``: the teacher backbone as a checkpoint that timm (and the embedders) load.

Format ``curation.vit/1``: ``timm.create_model(timm_model, pretrained=False, **model_kwargs)``
builds the architecture and ``load_state_dict(state_dict)`` (strict) fills it. The teacher,
not the student, is exported: it is the better model (an ensemble over the recent students; in
a distillation run, the EMA of the student). ``heads`` also carries the teacher's DINO and iBOT
heads and target state, so that the export can itself be a distillation teacher
(``curate train --distill-from``); loaders that only want the backbone ignore it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from curation.train.augment import IMAGENET_MEAN, IMAGENET_STD
from curation.train.checkpoint import load_checkpoint
from curation.train.config import TrainConfig

EXPORT_FORMAT = "curation.vit/1"
# Parameters that training needs and a plain ViT does not have.
TRAINING_ONLY = ("mask_token",)


def timm_arch_name(arch: str, patch_size: int) -> str:
    """A registered timm name of a plain ViT close to ours; model_kwargs fix every dimension."""
    import timm

    size = {"vit_small": "small", "vit_base": "base", "vit_large": "large", "vit_giant": "giant"}.get(arch, "small")
    candidates = [f"vit_{size}_patch{patch_size}_224"]
    if patch_size == 14 and size != "giant":  # timm's giant DINOv2 uses a SwiGLU MLP; ours is GELU
        candidates.insert(0, f"vit_{size}_patch14_dinov2")
    for name in candidates + ["vit_small_patch16_224"]:
        if timm.is_model(name):
            return name
    raise RuntimeError("timm registers no plain ViT; is timm installed?")


def timm_model_kwargs(cfg: TrainConfig) -> dict[str, Any]:
    m = cfg.model
    return {
        "img_size": cfg.crops.global_size,
        "patch_size": m.patch_size,
        "embed_dim": m.embed_dim,
        "depth": m.depth,
        "num_heads": m.num_heads,
        "mlp_ratio": m.mlp_ratio,
        "qkv_bias": True,
        "init_values": m.layerscale,
        "num_classes": 0,
        "global_pool": "token",
        "dynamic_img_size": True,  # other input sizes interpolate the position embeddings
    }


def teacher_backbone_state(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    prefix = "backbone."
    return {
        k[len(prefix) :]: v.detach().clone().float()
        for k, v in state["teacher"].items()
        if k.startswith(prefix) and k[len(prefix) :] not in TRAINING_ONLY
    }


def teacher_heads(state: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    def part(prefix: str) -> dict[str, torch.Tensor]:
        return {k[len(prefix) :]: v.detach().clone().float() for k, v in state["teacher"].items() if k.startswith(prefix)}

    return {
        "config": cfg.head.model_dump(mode="json"),
        "dino_head": part("dino_head."),
        "ibot_head": part("ibot_head."),
        "targets": state.get("targets"),
    }


def export_checkpoint(checkpoint: str | Path, output: str | Path) -> Path:
    state = load_checkpoint(checkpoint)
    cfg = TrainConfig.model_validate(state["config"])
    payload = {
        "format": EXPORT_FORMAT,
        "timm_model": timm_arch_name(cfg.model.arch, cfg.model.patch_size),
        "model_kwargs": timm_model_kwargs(cfg),
        "state_dict": teacher_backbone_state(state),
        "heads": teacher_heads(state, cfg),
        "meta": {
            "iteration": int(state["iteration"]),
            "source": str(checkpoint),
            "distilled_from": cfg.distill.teacher,
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
    }
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(output)
    return output


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The exported backbone as a timm model in eval mode (the embedders' loading path)."""
    import timm

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no exported backbone; write one with `curate export --checkpoint RUN --output {path}`")
    payload = torch.load(path, map_location="cpu", weights_only=True)
    if payload.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path}: format {payload.get('format')!r}, expected {EXPORT_FORMAT!r}")
    model = timm.create_model(payload["timm_model"], pretrained=False, **payload["model_kwargs"])
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(device).eval()
