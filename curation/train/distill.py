"""The frozen teacher of a distillation run (``curate train --distill-from CHECKPOINT``).

DINOv2 distils its smaller models from the ViT-g with the pretraining loop, changed in a few
places: the teacher is the larger network, frozen (no EMA), with its own DINO and iBOT heads and
target normalisation; the student runs without stochastic depth and without masking, the iBOT
loss covering every patch of the two global crops; an EMA of the student is kept on the side and
is the model to use (and what ``curate export`` writes).

Where the teacher comes from:
- a training run or checkpoint (``curate train``): its teacher backbone, heads and centring state;
- a ``curate export`` file: the backbone, and the heads when the export holds them;
- ``timm:<model>`` (pretrained weights from the local Hugging Face cache) or
  ``timm:<model>@<weights file>``: any timm ViT.
A teacher without heads gets frozen random ones (seeded); its targets are then fixed random
projections of its features, which still carry its neighbourhood structure.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from curation.train.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from curation.train.config import HeadConfig, TrainConfig
from curation.train.heads import DINOHead, build_head
from curation.train.network import HeadedBackbone, SSLNetwork, TimmBackbone

log = logging.getLogger(__name__)


def _read(path: Path) -> dict:
    if path.is_dir():
        return load_checkpoint(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no distillation teacher here; give a `curate train` run, a `curate export` file or timm:<model>"
        )
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def _timm(name: str | None, checkpoint: str | Path | None) -> TimmBackbone:
    from embedders.timm_model import build_timm_model

    model, _ = build_timm_model(name, pretrained=checkpoint is None, checkpoint=checkpoint, model_kwargs={"dynamic_img_size": True})
    return TimmBackbone(model)


def _heads(backbone: nn.Module, saved: dict | None, cfg: TrainConfig) -> tuple[nn.Module, nn.Module]:
    if saved is not None:
        head_cfg = HeadConfig.model_validate(saved["config"])
        heads = []
        for key in ("dino_head", "ibot_head"):
            head = build_head(head_cfg, backbone.embed_dim)
            head.load_state_dict(saved[key])
            heads.append(head)
        return heads[0], heads[1]
    log.warning("the distillation teacher has no DINO/iBOT heads: using frozen random heads (seed %d)", cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed + 1)
        return build_head(cfg.head, backbone.embed_dim), build_head(cfg.head, backbone.embed_dim)


def load_teacher(spec: str, cfg: TrainConfig) -> tuple[HeadedBackbone, dict | None]:
    """(frozen teacher network in eval mode, its teacher-target state or None) for ``spec``."""
    from curation.train.export import EXPORT_FORMAT

    targets = None
    if spec.startswith("timm:"):
        name, _, weights = spec[len("timm:") :].partition("@")
        backbone = _timm(name, weights or None)
        net = HeadedBackbone(backbone, *_heads(backbone, None, cfg))
    else:
        payload = _read(Path(spec))
        fmt = payload.get("format")
        if fmt == CHECKPOINT_FORMAT:
            net = SSLNetwork(TrainConfig.model_validate(payload["config"]), drop_path_rate=0.0)
            net.load_state_dict(payload["teacher"])
            targets = payload.get("targets")
        elif fmt == EXPORT_FORMAT:
            backbone = _timm(None, spec)
            heads = payload.get("heads")
            net = HeadedBackbone(backbone, *_heads(backbone, heads, cfg))
            targets = heads.get("targets") if heads else None
        else:
            raise ValueError(f"{spec}: format {fmt!r} is neither a training checkpoint nor a `curate export` file")
    net.requires_grad_(False).eval()
    check_teacher(net, cfg)
    return net, targets


def teacher_patch_size(net: HeadedBackbone) -> int:
    return int(net.backbone.patch_size)


def check_teacher(net: HeadedBackbone, cfg: TrainConfig) -> None:
    """The student's heads must speak the teacher's prototypes, and iBOT needs the same patch grid."""
    out_dim = net.dino_head.last_layer.weight.shape[0] if isinstance(net.dino_head, DINOHead) else None
    if out_dim is not None and out_dim != cfg.head.out_dim:
        raise ValueError(f"the teacher's heads have {out_dim} prototypes, the student's {cfg.head.out_dim}: set head.out_dim={out_dim}")
    patch = teacher_patch_size(net)
    if cfg.uses_ibot and patch != cfg.model.patch_size:
        raise ValueError(
            f"the teacher's patch size is {patch}, the student's {cfg.model.patch_size}: iBOT compares patch by patch; "
            f"set model.patch_size={patch}, or loss.ibot_weight=0"
        )


__all__ = ["load_teacher", "check_teacher", "teacher_patch_size"]
