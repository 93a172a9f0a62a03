"""Per-iteration schedules (learning rate, weight decay, teacher momentum and temperature).

Precomputed arrays as in DINO/DINOv2: an optional frozen prefix at 0, a linear warm-up, then a
half-cosine from the base to the final value. Past the end the final value holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def cosine_schedule(
    base: float, final: float, total_iters: int, warmup_iters: int = 0, start_warmup: float = 0.0, freeze_iters: int = 0
) -> np.ndarray:
    freeze = np.zeros(min(freeze_iters, total_iters))
    warmup = np.linspace(start_warmup, base, min(warmup_iters, total_iters - len(freeze)), endpoint=False)
    n_cos = max(total_iters - len(freeze) - len(warmup), 0)
    steps = np.arange(n_cos)
    cosine = final + 0.5 * (base - final) * (1 + np.cos(math.pi * steps / max(n_cos, 1)))
    return np.concatenate([freeze, warmup, cosine]).astype(np.float64)


def linear_warmup_constant(start: float, value: float, warmup_iters: int, total_iters: int) -> np.ndarray:
    """Teacher temperature: linear from ``start`` to ``value`` over the warm-up, then constant."""
    n = min(warmup_iters, total_iters)
    return np.concatenate([np.linspace(start, value, n, endpoint=False), np.full(total_iters - n, value)])


@dataclass
class Schedules:
    lr: np.ndarray
    weight_decay: np.ndarray
    momentum: np.ndarray
    teacher_temp: np.ndarray
    last_layer_lr: np.ndarray

    def at(self, it: int) -> dict[str, float]:
        def pick(a: np.ndarray) -> float:
            return float(a[min(it, len(a) - 1)])

        return {
            "lr": pick(self.lr),
            "weight_decay": pick(self.weight_decay),
            "momentum": pick(self.momentum),
            "teacher_temp": pick(self.teacher_temp),
            "last_layer_lr": pick(self.last_layer_lr),
        }


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """DINOv2 scales the learning rate with the square root of the batch relative to 1024."""
    return base_lr * math.sqrt(global_batch / 1024)


def build_schedules(cfg, iters_per_epoch: int, global_batch: int) -> Schedules:
    o, lo = cfg.optim, cfg.loss
    total = max(o.epochs * iters_per_epoch, 1)
    lr = scaled_lr(o.base_lr, global_batch)
    warmup = int(o.warmup_epochs * iters_per_epoch)
    lr_s = cosine_schedule(lr, o.min_lr, total, warmup_iters=warmup)
    # The last layer stays frozen (lr 0) for its frozen prefix and then follows the main schedule.
    frozen = int(o.freeze_last_layer_epochs * iters_per_epoch)
    last = np.concatenate([np.zeros(min(frozen, total)), lr_s[min(frozen, total):]])
    return Schedules(
        lr=lr_s,
        weight_decay=cosine_schedule(o.weight_decay, o.weight_decay_end, total),
        momentum=cosine_schedule(o.momentum_teacher, o.final_momentum_teacher, total),
        teacher_temp=linear_warmup_constant(
            lo.warmup_teacher_temp, lo.teacher_temp, int(lo.warmup_teacher_temp_epochs * iters_per_epoch), total
        ),
        last_layer_lr=last,
    )
