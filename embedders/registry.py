"""Model specs as they appear in pipeline YAML, and the factory that builds embedders from them.

```yaml
model: {type: timm, name: vit_large_patch14_dinov2.lvd142m}
model: {type: timm, checkpoint: runs/train/export.pt}        # trainer export (curation.vit/1)
model: {type: timm, name: vit_small_patch16_224, pretrained: false, img_size: 64}   # tests only
model: {type: sscd, path: sscd_disc_mixup.torchscript.pt}
model: {type: pixels, size: 32, grayscale: true}
```

``spec.check()`` verifies on the driver that weights exist (a stage's ``preflight``) and
``spec.output_dim()`` gives the output size without loading the weights (for output schemas).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from embedders.base import Embedder, EmbedderUnavailable


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TimmSpec(_Spec):
    type: Literal["timm"] = "timm"
    name: str | None = Field(None, description="timm model name, e.g. vit_large_patch14_dinov2.lvd142m; optional for a trainer export")
    pretrained: bool = Field(True, description="false = random initialisation, only for tests and throughput benchmarks")
    checkpoint: str | None = Field(None, description="local weights: timm checkpoint, plain state_dict or a curation.vit/1 export")
    img_size: int | None = Field(None, ge=16, description="input resolution override")
    model_kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model arguments")

    def check(self) -> None:
        from embedders.timm_model import load_checkpoint_file, weights_cached, weights_location

        if self.checkpoint:
            load_checkpoint_file(self.checkpoint)
        elif not self.name:
            raise EmbedderUnavailable("a timm model needs 'name' or 'checkpoint'")
        elif self.pretrained and not weights_cached(self.name):
            raise EmbedderUnavailable(
                f"pretrained weights for timm model {self.name!r} are not available offline. Get them from "
                f"{weights_location(self.name)}; or pass 'checkpoint: /path/to/weights' in the model config."
            )

    def output_dim(self) -> int:
        from embedders.timm_model import feature_dim

        kwargs = dict(self.model_kwargs)
        if self.img_size:
            kwargs["img_size"] = self.img_size
        return feature_dim(self.name, kwargs, self.checkpoint)

    def build(self, device=None, batch_size: int = 64) -> Embedder:
        from embedders.timm_model import TimmEmbedder

        return TimmEmbedder(
            self.name,
            pretrained=self.pretrained,
            checkpoint=self.checkpoint,
            img_size=self.img_size,
            model_kwargs=self.model_kwargs,
            device=device,
            batch_size=batch_size,
        )


class SscdSpec(_Spec):
    type: Literal["sscd"] = "sscd"
    path: str = Field("sscd_disc_mixup.torchscript.pt", description="TorchScript file; bare names are looked up in $CURATION_MODELS")
    resize: int = Field(288, ge=32, description="short side in pixels (the SSCD authors' recommendation)")
    square_size: int | None = Field(None, ge=32, description="resize to a square instead (faster batching on GPU)")
    dim: int = Field(512, ge=1, description="descriptor size: 512 for ResNet-50 models, 1024 for sscd_disc_large")

    def check(self) -> None:
        from embedders.sscd import missing_sscd_message, resolve_sscd_path

        p = resolve_sscd_path(self.path)
        if not p.is_file():
            raise EmbedderUnavailable(missing_sscd_message(p))

    def output_dim(self) -> int:
        return self.dim

    def build(self, device=None, batch_size: int = 64) -> Embedder:
        from embedders.sscd import SscdEmbedder

        return SscdEmbedder(self.path, resize=self.resize, square_size=self.square_size, dim=self.dim, device=device, batch_size=batch_size)


class PixelsSpec(_Spec):
    type: Literal["pixels"] = "pixels"
    size: int = Field(32, ge=2, le=256)
    grayscale: bool = True

    def check(self) -> None:
        """Nothing to load."""

    def output_dim(self) -> int:
        return self.size * self.size * (1 if self.grayscale else 3)

    def build(self, device=None, batch_size: int = 1024) -> Embedder:
        from embedders.pixels import PixelsEmbedder

        return PixelsEmbedder(self.size, self.grayscale, device=device, batch_size=batch_size)


EmbedderSpec = Annotated[Union[TimmSpec, SscdSpec, PixelsSpec], Field(discriminator="type")]
_ADAPTER: TypeAdapter = TypeAdapter(EmbedderSpec)


def parse_spec(spec: EmbedderSpec | dict[str, Any]) -> TimmSpec | SscdSpec | PixelsSpec:
    """A spec from a YAML mapping (``type`` defaults to timm) or an already-parsed spec."""
    if isinstance(spec, (TimmSpec, SscdSpec, PixelsSpec)):
        return spec
    spec = dict(spec)
    spec.setdefault("type", "timm")
    return _ADAPTER.validate_python(spec)


def output_dim(spec: EmbedderSpec | dict[str, Any]) -> int:
    """Descriptor size without loading weights."""
    return parse_spec(spec).output_dim()


def build_embedder(spec: EmbedderSpec | dict[str, Any], device=None, batch_size: int | None = None) -> Embedder:
    """Build (and load) the embedder a spec describes. Raises ``EmbedderUnavailable``."""
    s = parse_spec(spec)
    return s.build(device=device) if batch_size is None else s.build(device=device, batch_size=batch_size)


def check_available(spec: EmbedderSpec | dict[str, Any]) -> None:
    """Cheap driver-side check that the weights exist. Raises ``EmbedderUnavailable``."""
    parse_spec(spec).check()


__all__ = ["TimmSpec", "SscdSpec", "PixelsSpec", "EmbedderSpec", "parse_spec", "build_embedder", "check_available", "output_dim"]
