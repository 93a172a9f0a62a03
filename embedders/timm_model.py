"""Any timm model as an embedder: pretrained weights, a local checkpoint, or our trainer's export.

Default retrieval model: the DINOv2 paper retrieved with a self-supervised ViT-H/16 pretrained
on ImageNet-22k. timm has no ViT-H/16 of that kind; the closest match in size, data and
training signal is ``vit_huge_patch14_gap_224.in22k_ijepa`` (I-JEPA, self-supervised, ViT-H/14,
ImageNet-22k). ``vit_large_patch14_dinov2.lvd142m`` is the stronger off-the-shelf retriever, but
it was itself trained on LVD-142M, so it is not the default for rebuilding that dataset.

Weights are never downloaded by the pipeline (``HF_HUB_OFFLINE`` runs): they come from the
Hugging Face hub cache / torch hub cache, or from ``checkpoint:`` (a timm checkpoint, a plain
state_dict, or a ``curation.vit/1`` file written by ``curate export``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from embedders.base import Embedder, EmbedderUnavailable

DEFAULT_RETRIEVAL_MODEL = "vit_huge_patch14_gap_224.in22k_ijepa"
TRAINER_FORMAT = "curation.vit/1"


def load_checkpoint_file(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint safely (tensors and plain containers only, never pickled code)."""
    path = Path(path)
    if not path.is_file():
        raise EmbedderUnavailable(f"checkpoint file {path} does not exist")
    try:
        try:  # memory-mapped: reading the metadata of a multi-GB file stays cheap
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickles with code, truncated files, ...
        raise EmbedderUnavailable(f"cannot read checkpoint {path} with torch.load(weights_only=True): {e}") from None
    if not isinstance(obj, dict):
        raise EmbedderUnavailable(f"checkpoint {path} holds a {type(obj).__name__}, expected a dict of tensors")
    return obj


def unwrap_state_dict(obj: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The weights inside the usual checkpoint wrappers (timm, DINO/DINOv2 teacher, DDP)."""
    for key in ("state_dict_ema", "state_dict", "model", "teacher"):
        if isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    sd = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not sd:
        raise EmbedderUnavailable("checkpoint holds no tensors")
    for prefix in ("module.", "backbone.", "_orig_mod."):
        if all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


_HEAD_PREFIXES = ("head.", "fc.", "classifier.", "head_dist.", "last_linear.")


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load strictly, except for classifier weights that the headless model does not have."""
    own = set(model.state_dict())
    state_dict = {k: v for k, v in state_dict.items() if k in own or not k.startswith(_HEAD_PREFIXES)}
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise EmbedderUnavailable(f"{source} does not match the model: {e}") from None


def weights_location(name: str) -> str:
    """Where timm looks for the pretrained weights of ``name`` (for error messages)."""
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return f"timm has no pretrained weights registered for {name!r} (see timm.list_models(pretrained=True))"
    fetch = f"`curate models fetch timm/{name} --trust-on-first-use` (into the weights cache, $CURATION_MODELS), or "
    if cfg.hf_hub_id:
        hf_home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        return (
            f"{fetch}Hugging Face hub repo {cfg.hf_hub_id!r}: on a connected machine run "
            f"`huggingface-cli download {cfg.hf_hub_id}` (or python -c \"import timm; timm.create_model('{name}', pretrained=True)\"), "
            f"then copy the hub cache ({hf_home}/hub) to this machine or point HF_HOME at it"
        )
    if cfg.url:
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        return f"{fetch}{cfg.url}: download it and put it in {hub_dir}/ (the torch hub cache)"
    return f"no download source registered for {name!r}"


def cached_weights_file(name: str) -> Path | None:
    """The file `curate models fetch timm/<name>` installed in the weights cache, if any."""
    from curation.models import timm_entry

    entry = timm_entry(name)
    return entry.path if entry is not None and entry.path.is_file() else None


def weights_cached(name: str) -> bool:
    """Whether pretrained weights for ``name`` are present locally (no network access): in the
    weights cache, the Hugging Face hub cache or the torch hub cache."""
    from timm.models import get_pretrained_cfg

    if cached_weights_file(name) is not None:
        return True
    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return False
    if cfg.hf_hub_id:
        from huggingface_hub import try_to_load_from_cache

        repo = cfg.hf_hub_id.split("@")[0]
        for fname in (cfg.hf_hub_filename, "open_clip_model.safetensors", "model.safetensors", "pytorch_model.bin"):
            if fname and isinstance(try_to_load_from_cache(repo, fname), str):
                return True
        return False
    if cfg.url:
        return (Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url)).is_file()
    return False


RANDOM_INIT_SEED = 0


def create_headless(name: str, pretrained: bool, kwargs: dict[str, Any]) -> torch.nn.Module:
    """timm.create_model without classifier. ``img_size`` is a build argument of ViTs only;
    convolutional models take any resolution, so for them it only sets the preprocessing."""
    import timm

    kwargs = {**kwargs, "num_classes": 0}
    local = cached_weights_file(name) if pretrained else None
    if local is not None:  # timm loads (and converts, with the model's filter) this file instead of downloading
        kwargs["pretrained_cfg_overlay"] = {**kwargs.get("pretrained_cfg_overlay", {}), "file": str(local)}
    # A random initialisation (tests, throughput runs) is seeded, so every embed worker of a run,
    # and a resumed run, build the same model: otherwise each worker embeds with its own weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(RANDOM_INIT_SEED)
        try:
            return timm.create_model(name, pretrained=pretrained, **kwargs)
        except TypeError as e:
            if "img_size" not in kwargs or "img_size" not in str(e):
                raise
            return timm.create_model(name, pretrained=pretrained, **{k: v for k, v in kwargs.items() if k != "img_size"})


def build_timm_model(
    name: str | None,
    *,
    pretrained: bool = True,
    checkpoint: str | Path | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, str]:
    """Create the model and load its weights; returns (model without classifier, display name)."""
    kwargs = dict(model_kwargs or {})
    if checkpoint is not None:
        obj = load_checkpoint_file(checkpoint)
        if obj.get("format") == TRAINER_FORMAT:
            arch = obj.get("timm_model")
            if not isinstance(arch, str):
                raise EmbedderUnavailable(f"{checkpoint}: {TRAINER_FORMAT} file without a 'timm_model' name")
            kwargs = {**dict(obj.get("model_kwargs") or {}), **kwargs}
            state_dict = unwrap_state_dict(obj["state_dict"])
            name = arch
        else:
            if not name:
                raise EmbedderUnavailable(f"{checkpoint} is not a {TRAINER_FORMAT} export: give the timm architecture in 'name'")
            state_dict = unwrap_state_dict(obj)
        model = create_headless(name, False, kwargs)
        load_weights(model, state_dict, f"checkpoint {checkpoint}")
        display = f"{name} ({Path(checkpoint).name})"
    else:
        if not name:
            raise EmbedderUnavailable("a timm embedder needs a model 'name' or a 'checkpoint'")
        if pretrained and not weights_cached(name):
            raise EmbedderUnavailable(
                f"pretrained weights for timm model {name!r} are not available offline. Get them from "
                f"{weights_location(name)}; or pass 'checkpoint: /path/to/weights' in the model config."
            )
        try:
            model = create_headless(name, pretrained, kwargs)
        except (OSError, RuntimeError) as e:
            if not pretrained:
                raise
            raise EmbedderUnavailable(f"cannot load pretrained weights for {name!r}: {e}. Source: {weights_location(name)}") from None
        display = name if pretrained else f"{name} (random init)"
    return model.eval(), display


def feature_dim(name: str | None, model_kwargs: dict[str, Any] | None = None, checkpoint: str | Path | None = None) -> int:
    """Embedding size of a timm architecture (or a trainer export) without allocating weights."""
    if checkpoint is not None:
        obj = load_checkpoint_file(checkpoint)
        if obj.get("format") == TRAINER_FORMAT:
            name = obj["timm_model"]
            model_kwargs = {**dict(obj.get("model_kwargs") or {}), **(model_kwargs or {})}
    if not name:
        raise EmbedderUnavailable("a timm embedder needs a model 'name' or a trainer 'checkpoint'")

    with torch.device("meta"):
        model = create_headless(name, False, model_kwargs or {})
    return int(model.num_features)


def _fixed_input_size(model: torch.nn.Module) -> tuple[int, int] | None:
    """The resolution a ViT-style model was built for, when it accepts no other."""
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size is None or getattr(pe, "dynamic_img_size", False) or getattr(pe, "strict_img_size", True) is False:
        return None
    return tuple(int(v) for v in size)


class TimmEmbedder(Embedder):
    """Pooled pre-logits features of a timm model, preprocessed as its pretrained config says."""

    def __init__(
        self,
        name: str | None = DEFAULT_RETRIEVAL_MODEL,
        *,
        pretrained: bool = True,
        checkpoint: str | Path | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        device=None,
        batch_size: int = 64,
    ):
        super().__init__(device, batch_size)
        from timm.data import create_transform, resolve_model_data_config

        kwargs = dict(model_kwargs or {})
        if img_size is not None:
            kwargs["img_size"] = img_size
        self.model, self.name = build_timm_model(name, pretrained=pretrained, checkpoint=checkpoint, model_kwargs=kwargs)
        self.model.to(self.device)
        self.dim = int(self.model.num_features)
        data_cfg = resolve_model_data_config(self.model)
        fixed = _fixed_input_size(self.model)
        if img_size is not None:
            data_cfg["input_size"] = (3, img_size, img_size)
        elif fixed is not None:  # e.g. a trainer export built with img_size in its model_kwargs
            data_cfg["input_size"] = (3, *fixed)
        self.data_config = data_cfg
        self.transform = create_transform(**data_cfg, is_training=False)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)

    def describe(self) -> dict:
        return {**super().describe(), "input_size": list(self.data_config["input_size"])}
