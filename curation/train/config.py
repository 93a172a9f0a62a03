"""Training configuration: one pydantic model with DINOv2's published defaults.

Values that DINOv2 states per epoch (warm-ups, frozen last layer) are given in epochs here and
converted to iterations by the trainer, because the length of an epoch depends on the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

# embed_dim, depth, num_heads of the ViT sizes DINOv2 trains (giant uses a GELU MLP here).
ARCHS: dict[str, tuple[int, int, int]] = {
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant": (1536, 40, 24),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    arch: Literal["vit_small", "vit_base", "vit_large", "vit_giant", "custom"] = "vit_small"
    patch_size: Literal[8, 14, 16] | int = 14
    embed_dim: int | None = Field(None, description="only for arch=custom")
    depth: int | None = Field(None, description="only for arch=custom")
    num_heads: int | None = Field(None, description="only for arch=custom")
    mlp_ratio: float = 4.0
    layerscale: float | None = Field(1e-5, description="LayerScale init value; None disables it")
    drop_path_rate: float = Field(0.1, ge=0, lt=1)
    skip_drop_compute: bool = Field(True, description="stochastic depth computes only the kept samples (DINOv2)")
    attention: Literal["default", "math"] = Field("default", description="'math' forces the unfused SDPA kernel")
    packing: bool = Field(False, description="global and local crops through each block in one pass, attention within each crop")
    packed_attention: Literal["by_size", "jagged"] = Field(
        "by_size",
        description="attention of packed crops: one fused SDPA call per crop size, or one call on nested jagged tensors "
        "(variable-length flash kernel on CUDA; an unfused per-crop loop on CPU)",
    )

    @model_validator(mode="after")
    def _dims(self) -> "ModelConfig":
        if self.arch == "custom":
            if None in (self.embed_dim, self.depth, self.num_heads):
                raise ValueError("arch=custom needs embed_dim, depth and num_heads")
        else:
            self.embed_dim, self.depth, self.num_heads = ARCHS[self.arch]
        if self.embed_dim % self.num_heads:
            raise ValueError("embed_dim must be divisible by num_heads")
        return self


class HeadConfig(Strict):
    out_dim: int = 65536
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    nlayers: int = 3


class CropConfig(Strict):
    global_size: int = 224
    local_size: int = 96
    n_local: int = Field(8, ge=0)
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)


class LossConfig(Strict):
    teacher_norm: Literal["sinkhorn_knopp", "centering"] = "sinkhorn_knopp"
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: float = 30
    center_momentum: float = 0.9
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    mask_ratio: tuple[float, float] = (0.1, 0.5)
    mask_probability: float = Field(0.5, ge=0, le=1, description="share of global crops that are masked")


class OptimConfig(Strict):
    epochs: int = 100
    iters_per_epoch: int | None = Field(None, description="default: manifest rows // global batch")
    batch_size: int = Field(64, ge=1, description="images per process")
    base_lr: float = Field(0.004, description="scaled by sqrt(global batch / 1024) as DINOv2")
    min_lr: float = 1e-6
    warmup_epochs: float = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.2
    momentum_teacher: float = 0.996
    final_momentum_teacher: float = 1.0
    clip_grad: float | None = 3.0
    freeze_last_layer_epochs: float = 1
    layerwise_decay: float = 0.9
    patch_embed_lr_mult: float = 0.2
    betas: tuple[float, float] = (0.9, 0.999)


class HiResConfig(Strict):
    """Optional short final phase at a higher global-crop resolution (DINOv2: 518 px).

    The last ``epochs`` of the schedule use ``global_size`` (and ``local_size`` if given); the
    position embeddings are interpolated to the larger grid at every forward, and the schedules
    run on unchanged.
    """

    global_size: int = 518
    local_size: int | None = Field(None, description="local crops in the phase (default: crops.local_size)")
    epochs: float = Field(0, ge=0)


Dtype = Literal["bf16", "fp16", "fp32"]


class FSDPConfig(Strict):
    """``strategy: fsdp``: PyTorch FSDP2 (``fully_shard``) on every block, backbone, head and the
    networks, with DINOv2's mixed-precision policy. Master weights and optimizer state stay fp32."""

    param_dtype: Dtype = Field("bf16", description="dtype parameters are all-gathered and computed in")
    reduce_dtype: Dtype = Field("bf16", description="dtype backbone gradients are reduce-scattered in")
    head_reduce_dtype: Dtype = Field("fp32", description="dtype DINO/iBOT head gradients are reduced in (DINOv2: fp32)")
    reshard_after_forward: bool = Field(
        False, description="free gathered parameters after the forward (ZeRO-3); False keeps them to the backward (SHARD_GRAD_OP, DINOv2)"
    )
    cpu_mixed_precision: bool = Field(
        False, description="apply the dtypes on CPU as well (gloo reduces bf16/fp16); by default CPU runs fp32 like the rest of the trainer"
    )


class DistillConfig(Strict):
    """Distillation (DINOv2's recipe): a frozen larger teacher with its DINO and iBOT heads gives
    the targets; no EMA for it; the EMA of the student is the model checkpoints export. The
    student runs without stochastic depth, and without masking unless ``masked_ibot``."""

    teacher: str | None = Field(
        None, description="training run/checkpoint, `curate export` file, or timm:<model>[@<weights file>]"
    )
    masked_ibot: bool = Field(False, description="mask the student's global crops as in pretraining (default: iBOT on all their patches, the paper's distillation)")


class DataConfig(Strict):
    num_workers: int = 4
    shuffle_buffer: int = Field(256, ge=1, description="rows held per worker for shuffling")
    verify_sha256: bool = False


class TrainConfig(Strict):
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    crops: CropConfig = Field(default_factory=CropConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    hires: HiResConfig = Field(default_factory=HiResConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    strategy: Literal["ddp", "fsdp"] = Field("ddp", description="replicated DDP, or FSDP2 sharding of student, teacher and optimizer")
    fsdp: FSDPConfig = Field(default_factory=FSDPConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    precision: Literal["bf16", "fp16", "fp32"] = Field("bf16", description="autocast dtype on CUDA; CPU runs fp32")
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = Field(1000, ge=1, description="iterations between checkpoints")
    max_iters: int | None = Field(None, description="stop early (tests, benchmarks)")
    max_minutes: float | None = Field(None, gt=0, description="stop (with a checkpoint) after this wall time; resume continues")

    @property
    def uses_ibot(self) -> bool:
        """Whether the iBOT term runs: masked patches, or (distillation) every global-crop patch."""
        if self.loss.ibot_weight <= 0:
            return False
        if self.distill.teacher and not self.distill.masked_ibot:
            return True
        return self.loss.mask_probability > 0


def set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = yaml.safe_load(value) if isinstance(value, str) else value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Config from a YAML/JSON file (optional) plus ``key.sub=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        text = Path(path).read_text()
        data = (json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)) or {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        set_dotted(data, key.strip(), value)
    return TrainConfig.model_validate(data)
