"""The networks the trainer optimises and distils from: a backbone with untied DINO and iBOT heads.

``HeadedBackbone`` is what a teacher needs (a pass over the global crops to the two heads' logits);
``SSLNetwork`` adds the student's pass over masked global and local crops. A frozen distillation
teacher may wrap a timm ViT instead of ours (``TimmBackbone`` gives it the same interface).
"""

from __future__ import annotations

import torch
from torch import nn

from curation.train.heads import build_head
from curation.train.vit import build_vit


class HeadedBackbone(nn.Module):
    def __init__(self, backbone: nn.Module, dino_head: nn.Module, ibot_head: nn.Module):
        super().__init__()
        self.backbone, self.dino_head, self.ibot_head = backbone, dino_head, ibot_head

    @torch.no_grad()
    def teacher_forward(self, global_crops: torch.Tensor, masks: torch.Tensor | None) -> dict:
        """DINO logits of the class tokens, iBOT logits of the patches selected by ``masks``."""
        feats = self.backbone.forward_features(global_crops)
        out = {"dino_global": self.dino_head(feats["cls"])}
        if masks is not None:
            out["ibot"] = self.ibot_head(feats["patches"][masks])
        return out


class SSLNetwork(HeadedBackbone):
    """Our ViT with untied DINO (class token) and iBOT (patch) heads: student, EMA teacher."""

    def __init__(self, cfg, drop_path_rate: float | None = None):
        model_cfg = cfg.model if drop_path_rate is None else cfg.model.model_copy(update={"drop_path_rate": drop_path_rate})
        super().__init__(
            build_vit(model_cfg, cfg.crops.global_size),
            build_head(cfg.head, cfg.model.embed_dim),
            build_head(cfg.head, cfg.model.embed_dim),
        )

    def forward(
        self, global_crops: torch.Tensor, local_crops: torch.Tensor | None, masks: torch.Tensor | None, mask_tokens: bool = True
    ) -> dict:
        """Student pass over the global crops (masked unless ``mask_tokens`` is False; ``masks``
        still picks the iBOT patches) and the local crops, through the backbone and heads."""
        xs, ms = [global_crops], [masks if mask_tokens else None]
        if local_crops is not None:
            xs, ms = xs + [local_crops], ms + [None]
        outs = self.backbone.forward_features_list(xs, ms)
        cls = torch.cat([o["cls"] for o in outs])
        logits = self.dino_head(cls)
        n_global = global_crops.shape[0]
        out = {"global_cls": outs[0]["cls"], "dino_global": logits[:n_global], "dino_local": logits[n_global:]}
        if masks is not None:
            out["ibot"] = self.ibot_head(outs[0]["patches"][masks])
        return out


class TimmBackbone(nn.Module):
    """A timm ViT behind our ``forward_features`` interface (class token, patch tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        size = model.patch_embed.patch_size
        self.patch_size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.embed_dim = model.embed_dim

    @property
    def blocks(self) -> nn.ModuleList:  # the units FSDP shards
        return self.model.blocks

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens = self.model.forward_features(x)
        return {"cls": tokens[:, 0], "patches": tokens[:, self.model.num_prefix_tokens :]}


__all__ = ["HeadedBackbone", "SSLNetwork", "TimmBackbone"]
