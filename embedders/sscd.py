"""SSCD copy-detection descriptors (Pizzi et al. 2022), the model the DINOv2 paper deduplicated with.

The released TorchScript files take ImageNet-normalised images and return one descriptor per
image (512-d for the ResNet-50 models, 1024-d for ``sscd_disc_large``). The authors recommend
resizing the short side to 288 px; a fixed square resize (``square_size``, e.g. 320) batches
better on GPUs at a small cost in accuracy.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms import v2 as T

from embedders.base import Embedder, EmbedderUnavailable

SSCD_REPO = "https://github.com/facebookresearch/sscd-copy-detection"
SSCD_DOWNLOAD = "https://dl.fbaipublicfiles.com/sscd-copy-detection/{file}"
DEFAULT_FILE = "sscd_disc_mixup.torchscript.pt"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def models_dir() -> Path:
    """Where the pipeline looks for model files given by bare name: the weights cache
    (``$CURATION_MODELS``, see curation/models.py)."""
    from curation.models import cache_dir

    return cache_dir()


def resolve_sscd_path(path: str | Path | None) -> Path:
    p = Path(path or DEFAULT_FILE).expanduser()
    if not p.is_absolute() and not p.exists():
        p = models_dir() / p
    return p


def missing_sscd_message(p: Path) -> str:
    return (
        f"SSCD model file {p} not found. Download {SSCD_DOWNLOAD.format(file=p.name)} "
        f"(listed in the README of {SSCD_REPO}, 'Pretrained models') and put it at {p}, "
        f"or set 'path:' in the model config (bare names are looked up in $CURATION_MODELS, now {models_dir()})."
    )


class SscdEmbedder(Embedder):
    def __init__(
        self,
        path: str | Path | None = None,
        *,
        resize: int = 288,
        square_size: int | None = None,
        dim: int = 512,
        device=None,
        batch_size: int = 64,
    ):
        super().__init__(device, batch_size)
        p = resolve_sscd_path(path)
        if not p.is_file():
            raise EmbedderUnavailable(missing_sscd_message(p))
        try:
            self.model = torch.jit.load(str(p), map_location=self.device).eval()
        except Exception as e:
            raise EmbedderUnavailable(f"{p} is not a loadable TorchScript SSCD model: {e}") from None
        self.name = f"sscd:{p.name}"
        self.dim = dim
        size = [square_size, square_size] if square_size else resize
        self.transform = T.Compose(
            [
                T.PILToTensor(),
                T.Resize(size, interpolation=T.InterpolationMode.BILINEAR, antialias=True),
                T.ToDtype(torch.float32, scale=True),
                T.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        self._check_dim()

    def _check_dim(self) -> None:
        """A wrong ``dim`` would only surface as a shape error deep in a run; fail at load."""
        probe = self.forward_batch(torch.zeros(1, 3, 64, 64))
        if probe.shape[1] != self.dim:
            raise EmbedderUnavailable(f"{self.name} returns {probe.shape[1]}-d descriptors; set 'dim: {probe.shape[1]}' in the model config")

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(image)

    def _forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch)
