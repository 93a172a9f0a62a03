"""DINOv2 training loop: student/teacher, losses, schedules, mixed precision, DDP or FSDP,
distillation, checkpoints.

Launch with ``curate train`` (one process) or ``torchrun --nproc_per_node N -m curation.train.cli
train`` (NCCL on CUDA, gloo on CPU); ``--strategy fsdp`` shards instead of replicating
(``distributed.py``), ``--distill-from`` trains against a frozen teacher (``distill.py``). A run
directory that already holds a checkpoint is resumed from it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from curation.train import checkpoint as ckpt
from curation.train.config import TrainConfig
from curation.train.data import Manifest, build_train_loader
from curation.train.distributed import DistInfo, full_value, init_distributed, local, pick_device, shard_network
from curation.train.losses import TeacherTargets, dino_loss, ibot_patch_loss, koleo_loss
from curation.train.network import SSLNetwork
from curation.train.schedules import Schedules, build_schedules
from curation.train.vit import check_crop_size

log = logging.getLogger(__name__)


# -- optimisation ------------------------------------------------------------------------------
def param_groups(model: SSLNetwork, cfg: TrainConfig) -> list[dict]:
    """AdamW groups with DINOv2's layer-wise lr decay, no weight decay on biases, norms, tokens
    and LayerScale, a reduced lr on the patch embedding and a flag on the prototype layers."""
    depth, o = cfg.model.depth, cfg.optim
    groups: dict[tuple, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("backbone."):
            sub = name[len("backbone.") :]
            if sub.startswith("blocks."):
                layer = int(sub.split(".")[1]) + 1
            elif sub.startswith(("patch_embed", "cls_token", "pos_embed", "mask_token")):
                layer = 0
            else:
                layer = depth + 1
        else:
            layer = depth + 1
        lr_mult = o.layerwise_decay ** (depth + 1 - layer)
        if "patch_embed" in name:
            lr_mult *= o.patch_embed_lr_mult
        no_wd = p.ndim == 1 or name.endswith(("cls_token", "pos_embed", "mask_token")) or ".ls" in name
        wd_mult = 0.0 if no_wd else 1.0
        is_last = "last_layer" in name
        key = (lr_mult, wd_mult, is_last)
        groups.setdefault(key, {"params": [], "lr_multiplier": lr_mult, "wd_multiplier": wd_mult, "is_last_layer": is_last})
        groups[key]["params"].append(p)
    return list(groups.values())


def apply_schedules(optimizer: torch.optim.Optimizer, values: dict[str, float]) -> None:
    for g in optimizer.param_groups:
        base = values["last_layer_lr"] if g["is_last_layer"] else values["lr"]
        g["lr"] = base * g["lr_multiplier"]
        g["weight_decay"] = values["weight_decay"] * g["wd_multiplier"]


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher = momentum * teacher + (1 - momentum) * student, parameter by parameter; under
    FSDP on each process's shards (both networks are sharded alike)."""
    t = [local(p) for _, p in sorted(teacher.named_parameters())]
    s = [local(p).detach() for _, p in sorted(student.named_parameters())]
    torch._foreach_mul_(t, momentum)
    torch._foreach_add_(t, s, alpha=1.0 - momentum)


def step_seed(seed: int, rank: int, it: int) -> int:
    return int(np.random.SeedSequence([seed, rank, it, 7]).generate_state(1, dtype=np.uint64)[0] >> 1)


# -- the trainer -------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, manifest_path: str | Path | None, output_dir: str | Path, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.fsdp = cfg.strategy == "fsdp"
        self.dist = dist_info or init_distributed(need_group=self.fsdp)
        self.device = pick_device(self.dist)
        self.output_dir = Path(output_dir)
        p = cfg.model.patch_size
        check_crop_size(cfg.crops.global_size, p, "crops.global_size")
        check_crop_size(cfg.crops.local_size, p, "crops.local_size")
        if cfg.hires.epochs > 0:
            check_crop_size(cfg.hires.global_size, p, "hires.global_size")
            check_crop_size(cfg.hires.local_size or cfg.crops.local_size, p, "hires.local_size")
        self.manifest = Manifest(manifest_path, cfg.data.verify_sha256) if manifest_path is not None else None
        self.global_batch = cfg.optim.batch_size * self.dist.world_size
        rows = self.manifest.total_rows if self.manifest else self.global_batch
        self.iters_per_epoch = cfg.optim.iters_per_epoch or max(rows // self.global_batch, 1)
        self.total_iters = max(cfg.optim.epochs * self.iters_per_epoch, 1)
        self.schedules: Schedules = build_schedules(cfg, self.iters_per_epoch, self.global_batch)
        hires_iters = int(cfg.hires.epochs * self.iters_per_epoch)
        self.hires_start = self.total_iters - hires_iters if hires_iters > 0 else None

        self.distilling = cfg.distill.teacher is not None
        torch.manual_seed(cfg.seed)  # identical initial weights on every process
        # DINOv2's distillation trains the student without stochastic depth
        self.student = SSLNetwork(cfg, drop_path_rate=0.0 if self.distilling else None).to(self.device)
        self.teacher = SSLNetwork(cfg).to(self.device)  # the EMA of the student (the model to export)
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False).eval()
        self.dino_targets = TeacherTargets(cfg.loss.teacher_norm, cfg.head.out_dim, cfg.loss.center_momentum).to(self.device)
        self.ibot_targets = TeacherTargets(cfg.loss.teacher_norm, cfg.head.out_dim, cfg.loss.center_momentum).to(self.device)
        self.frozen_teacher = self._load_frozen_teacher() if self.distilling else None
        if self.fsdp:
            for net in (self.student, self.teacher, self.frozen_teacher):
                if net is not None:
                    shard_network(net, cfg.fsdp, self.device)
        # built after sharding: FSDP replaces the parameters by their shards
        self.optimizer = torch.optim.AdamW(param_groups(self.student, cfg), betas=tuple(cfg.optim.betas))
        self.use_ibot = cfg.uses_ibot
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.precision) if self.device.type == "cuda" else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.iteration = 0
        self.student_ddp: nn.Module = self.student
        if self.dist.world_size > 1 and not self.fsdp:
            ids = [self.device.index] if self.device.type == "cuda" else None
            # without iBOT the patch head takes no part in the loss
            self.student_ddp = DistributedDataParallel(self.student, device_ids=ids, find_unused_parameters=not self.use_ibot)

    def _load_frozen_teacher(self) -> nn.Module:
        from curation.train.distill import load_teacher, teacher_patch_size

        net, targets = load_teacher(self.cfg.distill.teacher, self.cfg)
        size = max(self.cfg.crops.global_size, self.cfg.hires.global_size if self.cfg.hires.epochs > 0 else 0)
        check_crop_size(size, teacher_patch_size(net), "global crop size (for the teacher's patch size)")
        if self.cfg.loss.teacher_norm == "centering" and targets and "centering.center" in targets["dino"]:
            self.dino_targets.load_state_dict(targets["dino"])  # the teacher's own centres
            self.ibot_targets.load_state_dict(targets["ibot"])
        if self.dist.is_main:
            log.info("distilling from %s (frozen; the EMA of the student is the model to export)", self.cfg.distill.teacher)
        return net.to(self.device)

    def close(self) -> None:
        """Leave the process group if this trainer created it."""
        if self.dist.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # -- state --------------------------------------------------------------------------------
    def _sharded_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "student": get_model_state_dict(self.student),
            "teacher": get_model_state_dict(self.teacher),
            "optimizer": get_optimizer_state_dict(self.student, self.optimizer),
        }

    def state(self) -> dict[str, Any]:
        """The checkpoint (all processes call it under FSDP: the consolidated teacher is gathered)."""
        base = {
            "iteration": self.iteration,
            "config": self.cfg.model_dump(mode="json"),
            "strategy": self.cfg.strategy,
            "targets": {"dino": self.dino_targets.state_dict(), "ibot": self.ibot_targets.state_dict()},
            "scaler": self.scaler.state_dict(),
            "data": {"world_size": self.dist.world_size, "num_workers": self.cfg.data.num_workers, "batches_per_rank": self.iteration},
        }
        if not self.fsdp:
            return {**base, "student": self.student.state_dict(), "teacher": self.teacher.state_dict(), "optimizer": self.optimizer.state_dict()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.teacher, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {**base, "teacher": full}

    def load_state(self, state: dict[str, Any]) -> None:
        strategy = state.get("strategy", "ddp")
        if strategy != self.cfg.strategy:
            raise ValueError(f"this checkpoint was written with --strategy {strategy}; resume it with the same strategy")
        if self.fsdp:
            from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

            sharded = self._sharded_state()
            ckpt.load_sharded(sharded, self.output_dir / "checkpoints", state["sharded"])
            set_model_state_dict(self.student, sharded["student"])
            set_model_state_dict(self.teacher, sharded["teacher"])
            set_optimizer_state_dict(self.student, self.optimizer, sharded["optimizer"])
        else:
            self.student.load_state_dict(state["student"])
            self.teacher.load_state_dict(state["teacher"])
            self.optimizer.load_state_dict(state["optimizer"])
        self.dino_targets.load_state_dict(state["targets"]["dino"])
        self.ibot_targets.load_state_dict(state["targets"]["ibot"])
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iteration = int(state["iteration"])
        data = state.get("data", {})
        if (data.get("world_size"), data.get("num_workers")) != (self.dist.world_size, self.cfg.data.num_workers):
            log.warning("resuming with a different process or worker count: the data order differs from an uninterrupted run")

    def save(self) -> Path | None:
        directory = self.output_dir / "checkpoints"
        sharded = ckpt.save_sharded(self._sharded_state(), directory, self.iteration, self.dist.is_main) if self.fsdp else None
        state = self.state()
        if not self.dist.is_main:
            return None
        return ckpt.save_checkpoint({**state, "sharded": sharded} if sharded else state, directory)

    def maybe_resume(self) -> bool:
        last = ckpt.latest_checkpoint(self.output_dir / "checkpoints")
        if last is None:
            return False
        self.load_state(ckpt.load_checkpoint(last))
        if self.dist.is_main:
            log.info("resumed from %s at iteration %d", last, self.iteration)
        return True

    # -- one step -----------------------------------------------------------------------------
    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def _ibot_masks(self, batch: dict, global_crops: torch.Tensor) -> torch.Tensor | None:
        """Which global-crop patches the iBOT term covers: the batch's masks, or all of them
        when distilling without masking (DINOv2's distillation)."""
        if not self.use_ibot:
            return None
        if self.frozen_teacher is not None and not self.cfg.distill.masked_ibot:
            p = self.cfg.model.patch_size
            n_patches = (global_crops.shape[-2] // p) * (global_crops.shape[-1] // p)
            return torch.ones(global_crops.shape[0], n_patches, dtype=torch.bool, device=self.device)
        return batch["masks"].to(self.device, non_blocking=True)

    def _forward(self, global_crops, local_crops, masks) -> tuple[dict, dict]:
        """(outputs the targets come from, student outputs): the EMA teacher's, or the frozen
        distillation teacher's (whose student sees mask tokens only with ``distill.masked_ibot``)."""
        if self.frozen_teacher is None:
            return self.teacher.teacher_forward(global_crops, masks), self.student_ddp(global_crops, local_crops, masks)
        t_out = self.frozen_teacher.teacher_forward(global_crops, masks)
        return t_out, self.student_ddp(global_crops, local_crops, masks, mask_tokens=self.cfg.distill.masked_ibot)

    def train_step(self, batch: dict) -> dict[str, float]:
        """One optimisation step at ``self.iteration``; returns the losses and schedule values."""
        cfg, it = self.cfg, self.iteration
        torch.manual_seed(step_seed(cfg.seed, self.dist.rank, it))  # stochastic depth draws
        values = self.schedules.at(it)
        apply_schedules(self.optimizer, values)
        global_crops = batch["global_crops"].to(self.device, non_blocking=True)
        local_crops = batch["local_crops"].to(self.device, non_blocking=True) if batch["local_crops"] is not None else None
        masks = self._ibot_masks(batch, global_crops)
        temp = values["teacher_temp"]
        self.student.train()

        with self._autocast():
            t_out, s_out = self._forward(global_crops, local_crops, masks)
        teacher_probs = self.dino_targets(t_out["dino_global"], temp).chunk(2)
        student_views = list(s_out["dino_global"].chunk(2))
        if local_crops is not None and cfg.crops.n_local:
            student_views += list(s_out["dino_local"].chunk(cfg.crops.n_local))
        losses = {"dino": dino_loss(student_views, teacher_probs, cfg.loss.student_temp)}
        total = cfg.loss.dino_weight * losses["dino"]
        if masks is not None:
            n_masked = masks.sum().to(torch.float32)
            if self.dist.world_size > 1:
                dist.all_reduce(n_masked)
            ibot_probs = self.ibot_targets(t_out["ibot"], temp, n_samples=int(n_masked.item()))
            losses["ibot"] = ibot_patch_loss(s_out["ibot"], ibot_probs, masks, cfg.loss.student_temp)
            total = total + cfg.loss.ibot_weight * losses["ibot"]
        if cfg.loss.koleo_weight > 0:
            losses["koleo"] = sum(koleo_loss(c) for c in s_out["global_cls"].chunk(2))
            total = total + cfg.loss.koleo_weight * losses["koleo"]
        if not torch.isfinite(total):
            raise FloatingPointError(f"loss is {total.item()} at iteration {it}")

        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if cfg.optim.clip_grad:
            self.scaler.unscale_(self.optimizer)
            grad_norm = float(full_value(nn.utils.clip_grad_norm_(self.student.parameters(), cfg.optim.clip_grad)))
        else:
            grad_norm = float("nan")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        ema_update(self.teacher, self.student, values["momentum"])
        self.iteration += 1
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in losses.items()}, "grad_norm": grad_norm, **values}
    # -- the loop -----------------------------------------------------------------------------
    def crop_sizes_at(self, it: int) -> tuple[int, int]:
        """(global, local) crop size at iteration ``it``: the high-resolution phase's at the end."""
        c, h = self.cfg.crops, self.cfg.hires
        if self.hires_start is not None and it >= self.hires_start:
            return h.global_size, h.local_size or c.local_size
        return c.global_size, c.local_size

    def fit(self, resume: bool = True) -> dict[str, Any]:
        if self.manifest is None:
            raise ValueError("training needs a manifest")
        if resume:
            self.maybe_resume()
        stop = self.total_iters if self.cfg.max_iters is None else min(self.total_iters, self.cfg.max_iters)
        log_path = self.output_dir / "train_log.jsonl"
        if self.dist.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "train_config.json").write_text(json.dumps(self.cfg.model_dump(mode="json"), indent=2))
        loader_iter, loader_size, last = None, None, {}
        t0, n_images = time.perf_counter(), 0
        while self.iteration < stop:
            sizes = self.crop_sizes_at(self.iteration)
            if sizes != loader_size:  # start, or entering the high-resolution phase
                loader = build_train_loader(self.cfg, self.manifest, self.dist.rank, self.dist.world_size, self.iteration, *sizes)
                loader_iter, loader_size = iter(loader), sizes
            batch = next(loader_iter)
            last = self.train_step(batch)
            n_images += len(batch["rows"]) * self.dist.world_size
            out_of_time = self.cfg.max_minutes is not None and time.perf_counter() - t0 > 60 * self.cfg.max_minutes
            if self.dist.world_size > 1 and self.cfg.max_minutes is not None:  # every process stops together
                flag = torch.tensor(float(out_of_time), device=self.device)
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
                out_of_time = bool(flag.item())
            done = self.iteration == stop or out_of_time
            if self.dist.is_main and (self.iteration % self.cfg.log_every == 0 or done):
                last["images_per_s"] = n_images / (time.perf_counter() - t0)
                record = {"iteration": self.iteration, "epoch": self.iteration / self.iters_per_epoch, "global_size": sizes[0], **last}
                with open(log_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("it %d loss %.4f (%s)", self.iteration, last["loss"], ", ".join(f"{k} {v:.4g}" for k, v in last.items()))
            if self.iteration % self.cfg.checkpoint_every == 0 or done:
                self.save()
            if done:
                break
        if self.dist.world_size > 1:
            dist.barrier()
        return {"iteration": self.iteration, "total_iters": self.total_iters, "last": last}


def train(cfg: TrainConfig, manifest: str | Path, output_dir: str | Path, resume: bool = True) -> dict[str, Any]:
    """Train (or resume) and return a summary; checkpoints go to ``output_dir/checkpoints``."""
    trainer = Trainer(cfg, manifest, output_dir)
    try:
        return trainer.fit(resume=resume)
    finally:
        trainer.close()


__all__ = ["SSLNetwork", "Trainer", "train", "init_distributed", "param_groups", "ema_update"]
