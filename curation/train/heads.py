"""Projection heads: DINO's 3-layer MLP, L2 normalisation, weight-normalised prototypes.

The last layer is a linear map whose rows are L2-normalised at every call (weight norm with the
gain fixed to 1, as DINO/DINOv2 train it); storing only the direction keeps the state dict a
plain tensor dict, loadable with ``weights_only=True``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = PrototypeLayer(bottleneck_dim, out_dim)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return self.last_layer(x)


def build_head(head_cfg, in_dim: int) -> DINOHead:
    return DINOHead(in_dim, head_cfg.out_dim, head_cfg.hidden_dim, head_cfg.bottleneck_dim, head_cfg.nlayers)
