"""Process groups and the two data-parallel strategies of the trainer.

``ddp`` replicates the student on every process and all-reduces its gradients. ``fsdp`` shards
student, teacher and optimizer state with PyTorch's FSDP2 (``fully_shard``): every transformer
block, the rest of the backbone, each head and the network root are units whose parameters are
all-gathered for compute in ``fsdp.param_dtype`` and whose gradients are reduce-scattered in
``fsdp.reduce_dtype`` (the heads in ``fsdp.head_reduce_dtype``, fp32 as DINOv2); the master weights
and AdamW state stay fp32 shards. Networks without trainable parameters (the EMA teacher, a
frozen distillation teacher) free their gathered parameters after each forward, so between steps
every parameter is a shard and the EMA update is a local operation on matching shards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # this process created the group and destroys it at the end

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def init_distributed(need_group: bool = False) -> DistInfo:
    """Join the process group that torchrun (or a test's spawn) describes in the environment.

    ``need_group``: FSDP needs a group even in one process; that one is a group of one.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        if not need_group or dist.is_initialized():
            return DistInfo()
        dist.init_process_group(backend=_backend(), store=dist.HashStore(), rank=0, world_size=1)
        return DistInfo(owns_group=True)
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=_backend(), rank=info.rank, world_size=world)
        info.owns_group = True
    return info


def pick_device(info: DistInfo) -> torch.device:
    return torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")


def mixed_precision(fsdp_cfg, device: torch.device, reduce_dtype: str):
    """FSDP2's policy; on CPU fp32 unless ``fsdp.cpu_mixed_precision`` (gloo handles bf16/fp16)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type != "cuda" and not fsdp_cfg.cpu_mixed_precision:
        return MixedPrecisionPolicy()
    param = DTYPES[fsdp_cfg.param_dtype]
    return MixedPrecisionPolicy(param_dtype=None if param == torch.float32 else param, reduce_dtype=DTYPES[reduce_dtype])


def shard_network(net: nn.Module, fsdp_cfg, device: torch.device) -> None:
    """``fully_shard`` a backbone-with-heads network (``network.HeadedBackbone``) in place."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    trainable = any(p.requires_grad for p in net.parameters())
    reshard = fsdp_cfg.reshard_after_forward or not trainable  # nothing to keep for a backward
    body = {"mp_policy": mixed_precision(fsdp_cfg, device, fsdp_cfg.reduce_dtype), "reshard_after_forward": reshard}
    heads = {"mp_policy": mixed_precision(fsdp_cfg, device, fsdp_cfg.head_reduce_dtype), "reshard_after_forward": reshard}
    for block in net.backbone.blocks:
        fully_shard(block, **body)
    fully_shard(net.backbone, **body)
    for method in ("forward_features", "forward_features_list"):  # called directly, not through forward()
        if hasattr(net.backbone, method):
            register_fsdp_forward_method(net.backbone, method)
    fully_shard(net.dino_head, **heads)
    fully_shard(net.ibot_head, **heads)
    fully_shard(net, **body)
    register_fsdp_forward_method(net, "teacher_forward")


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of an FSDP (DTensor) parameter; a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def full_value(t: torch.Tensor) -> torch.Tensor:
    """The whole value of a (possibly sharded or partial) tensor, e.g. FSDP's gradient norm."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


__all__ = ["DistInfo", "init_distributed", "pick_device", "mixed_precision", "shard_network", "local", "full_value", "DTYPES"]
