"""DINOv2 objectives: DINO (class token), iBOT (masked patches), KoLeo.

Teacher outputs are turned into targets either by Sinkhorn-Knopp (DINOv2: each prototype gets an
equal share of the batch, which prevents collapse without a running centre) or by DINO's
centring. Under torch.distributed the batch statistics are summed over all processes, so the
targets are those of the global batch.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


def _all_reduce(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
    return t


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: torch.Tensor, temp: float, n_iters: int = 3, n_samples: int | None = None) -> torch.Tensor:
    """Targets (B, K) whose rows sum to 1 and whose columns each hold ~B/K of the mass.

    ``n_samples`` is the number of rows over all processes (default: B x world size).
    """
    logits = teacher_logits.float()
    # The same shift on every process (only for the range of exp); a process may hold no rows.
    top = logits.max().detach().clone() if logits.numel() else logits.new_tensor(float("-inf"))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(top, op=dist.ReduceOp.MAX)
    q = torch.exp((logits - top) / temp).t()  # K, B
    k = q.shape[0]
    b = n_samples if n_samples is not None else q.shape[1] * world_size()
    q /= _all_reduce(q.sum())
    for _ in range(n_iters):
        q /= _all_reduce(q.sum(dim=1, keepdim=True))  # each prototype: 1/K of the mass
        q /= k
        q /= q.sum(dim=0, keepdim=True)  # each sample: 1/B of the mass
        q /= b
    return (q * b).t()


class Centering(nn.Module):
    """DINO's teacher centring: subtract an EMA of the batch-mean logits, then sharpen."""

    def __init__(self, out_dim: int, momentum: float = 0.9):
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        probs = F.softmax((teacher_logits.float() - self.center) / temp, dim=-1)
        batch_sum = _all_reduce(teacher_logits.float().sum(dim=0, keepdim=True))
        n = torch.tensor(float(teacher_logits.shape[0]), device=teacher_logits.device)
        batch_center = batch_sum / _all_reduce(n).clamp(min=1)
        self.center.mul_(self.momentum).add_(batch_center, alpha=1 - self.momentum)
        return probs


class TeacherTargets(nn.Module):
    """Sinkhorn-Knopp or centring, chosen by config, with one interface."""

    def __init__(self, method: str, out_dim: int, center_momentum: float = 0.9):
        super().__init__()
        self.method = method
        self.centering = Centering(out_dim, center_momentum) if method == "centering" else None

    def forward(self, teacher_logits: torch.Tensor, temp: float, n_samples: int | None = None) -> torch.Tensor:
        if self.centering is not None:
            return self.centering(teacher_logits, temp)
        return sinkhorn_knopp(teacher_logits, temp, n_samples=n_samples)


def dino_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temp: float = 0.1
) -> torch.Tensor:
    """Cross-entropy of every student view against every teacher (global) view, same views excluded.

    ``student_logits[i]`` for i < len(teacher_probs) are the global views matching
    ``teacher_probs[i]``; the remaining ones are local views. The mean is over pairs and samples.
    """
    total, n_pairs = 0.0, 0
    for si, s in enumerate(student_logits):
        log_p = F.log_softmax(s.float() / student_temp, dim=-1)
        for ti, t in enumerate(teacher_probs):
            if si == ti:
                continue
            total = total - (t * log_p).sum(dim=-1).mean()
            n_pairs += 1
    if n_pairs == 0:
        raise ValueError("the DINO loss needs at least two views")
    return total / n_pairs


def ibot_patch_loss(
    student_masked_logits: torch.Tensor, teacher_masked_probs: torch.Tensor, masks: torch.Tensor, student_temp: float = 0.1
) -> torch.Tensor:
    """iBOT cross-entropy on the masked patches; each image weighs the same whatever its mask size.

    ``*_masked_*`` are (M, K) rows for ``masks.nonzero()`` in row-major order; ``masks`` is (B, N).
    """
    if student_masked_logits.shape[0] == 0:
        return student_masked_logits.sum() * 0.0
    per_patch = (teacher_masked_probs * F.log_softmax(student_masked_logits.float() / student_temp, dim=-1)).sum(dim=-1)
    weight = (1.0 / masks.sum(dim=-1).clamp(min=1.0)).unsqueeze(-1).expand_as(masks)[masks]
    return -(per_patch * weight).sum() / masks.shape[0]


def koleo_loss(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Kozachenko-Leonenko entropy estimator: -mean log distance to the nearest neighbour.

    Minimising it pushes the L2-normalised features of a batch apart (uniform spread).
    """
    x = F.normalize(x.float(), dim=-1, eps=eps)
    with torch.no_grad():
        dots = x @ x.t()
        dots.fill_diagonal_(-2.0)
        nn_idx = dots.argmax(dim=1)
    dist_nn = F.pairwise_distance(x, x[nn_idx], p=2, eps=eps)
    return -torch.log(dist_nn + eps).mean()
