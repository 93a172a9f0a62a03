"""Score every image with an NSFW classifier and drop those at or above a threshold.

The default threshold, 0.8, is the Open-NSFW authors' own guidance (scores above 0.8 are NSFW
with high probability, below 0.2 safe); a lower value removes more borderline images.

Missing weights stop the run in ``preflight`` with instructions, unless the run was started with
``--allow-missing-weights``: then every row passes unscored (``nsfw_score`` null) and the
manifest says that NSFW filtering was NOT applied. ``if_missing: skip`` does the same for this
stage alone (the weight-free ``offline`` pipeline). ``enabled: false`` skips the stage outright.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curation import schema
from curation.imaging import DecodeError, decode_rgb
from curation.devices import torch_device_name, wants_gpu
from curation.safety.nsfw import NsfwBackend, available_backends, backend_class
from curation.stage import WEIGHT_FREE_HINT, MapStage, OptionalWeights, Resources, StageError
from curation.stages._images import ImageStageConfig, error_details

NSFW_SCORE = "nsfw_score"
NSFW_REASON = "nsfw"
CPU_MODEL_BATCH = 16


class Config(ImageStageConfig):
    kind: Literal["nsfw"] = "nsfw"
    threshold: float = Field(
        0.8, ge=0, description="images scoring at or above this are dropped (above 1: score only, drop nothing)"
    )
    batch_size: int = Field(64, ge=1, description="images per Ray batch, and per model call on a GPU (a CPU calls the model on at most 16)")
    weights: Path | None = Field(None, description="weights file; null: the backend's own default location")
    backend: str = Field("opennsfw2", description="NSFW classifier (see curation.safety.nsfw)")
    if_missing: Literal["refuse", "skip"] = Field(
        "refuse", description="missing weights: refuse to run (unless --allow-missing-weights), or skip: every image passes "
        "unscored and the manifest says NSFW filtering was NOT applied"
    )

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, v: str) -> str:
        if v not in available_backends():
            raise ValueError(f"unknown NSFW backend {v!r}; available: {', '.join(available_backends())}")
        return v

    def model_needs(self) -> list:
        from curation.models import nsfw_need

        need = nsfw_need(self.stage_name, backend_class(self.backend), self.weights)
        need.skippable = self.if_missing == "skip"
        return [need]


class NsfwStage(OptionalWeights, MapStage):
    kind = "nsfw"
    Config = Config
    roles = (schema.POOL, schema.SEED)

    @property
    def backend_cls(self) -> type[NsfwBackend]:
        return backend_class(self.config.backend)

    @property
    def weights_path(self) -> Path:
        from curation.models import nsfw_weights_path

        return nsfw_weights_path(self.backend_cls, self.config.weights)

    def weights_problem(self) -> str | None:
        return self.backend_cls.weights_problem(self.weights_path)

    def not_applied_what(self) -> str:
        return "NSFW filtering"

    @property
    def may_skip(self) -> bool:
        return self.context.allow_missing_weights or self.config.if_missing == "skip"

    def not_applied_warning(self, problem: str) -> str:
        why = "the run was started with --allow-missing-weights" if self.context.allow_missing_weights else "the stage has if_missing: skip"
        return f"NSFW filtering was NOT applied: {problem} ({why})"

    # -- contract -----------------------------------------------------------------------------
    def input_columns(self) -> tuple[str, ...]:
        return (schema.ROLE, schema.BYTES)

    def output_schema(self) -> pa.Schema:
        return pa.schema([pa.field(NSFW_SCORE, pa.float32())])

    def resources(self) -> Resources:
        gpu = wants_gpu(self.context.cluster_gpus)
        workers = max(1, self.context.cluster_gpus if gpu else self.context.cluster_cpus)
        return Resources(num_cpus=1.0, num_gpus=1.0 if gpu else 0.0, concurrency=(1, workers), batch_size=self.config.batch_size)

    def preflight(self) -> list[str]:
        return self.weights_preflight()

    def manifest_section(self) -> dict[str, Any]:
        not_applied = self.not_applied_section()
        if not_applied is not None:
            return not_applied
        return {
            "applied": True,
            "backend": self.config.backend,
            "model": self.backend_cls.description,
            "threshold": self.config.threshold,
            "weights": str(self.weights_path),
        }

    def setup(self) -> None:
        self._backend: NsfwBackend | None = None
        problem = self.weights_problem()
        if problem is not None:
            if self.may_skip:
                return  # rows pass unscored; the manifest says so
            raise StageError(self.missing_weights_help(problem))
        self._backend = self.backend_cls(self.weights_path, torch_device_name())

    def process(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        scores: list[float | None] = [None] * n
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        if self._backend is not None:
            self._score(batch, scores, reasons, details)
        return pa.table(
            {
                NSFW_SCORE: pa.array(scores, pa.float32()),
                schema.DROP_REASON: pa.array(reasons, pa.string()),
                schema.DROP_DETAILS: pa.array(details, pa.string()),
            }
        )

    # -- internals ----------------------------------------------------------------------------
    def _score(self, batch: pa.Table, scores: list, reasons: list, details: list) -> None:
        data = batch.column(schema.BYTES).to_pylist()
        roles = batch.column(schema.ROLE).to_pylist() if schema.ROLE in batch.column_names else [schema.POOL] * batch.num_rows
        rows, inputs = [], []
        for i, (blob, role) in enumerate(zip(data, roles)):
            if role not in self.roles:
                continue
            try:
                image = decode_rgb(blob or b"", **self.config.decode_limits, min_size=self._backend.decode_min_size)
                inputs.append(self._backend.preprocess(image))
                rows.append(i)
            except DecodeError as e:
                reasons[i], details[i] = e.reason, error_details(e)
        threshold = self.config.threshold
        step = self._model_batch()
        for start in range(0, len(rows), step):
            chunk = rows[start : start + step]
            probs = self._backend.predict(np.stack(inputs[start : start + len(chunk)]))
            for i, p in zip(chunk, probs):
                score = float(np.float32(p))
                scores[i] = score
                if score >= threshold:
                    reasons[i] = NSFW_REASON
                    details[i] = json.dumps({"score": round(score, 6), "threshold": threshold}, sort_keys=True)

    def _model_batch(self) -> int:
        """Images per model call: ``batch_size`` on a GPU; at most ``CPU_MODEL_BATCH`` on a CPU, where
        Open-NSFW's convolutions run 3-4x slower per image at 64 than at 16 (activations fall
        out of cache; measured with Keras 3 on torch, one thread)."""
        if torch_device_name() == "cuda":
            return self.config.batch_size
        return min(self.config.batch_size, CPU_MODEL_BATCH)

    def missing_weights_help(self, problem: str) -> str:
        from curation.models import cache_dir

        cls = self.backend_cls
        fetch = f"run `curate models fetch {cls.name} --trust-on-first-use` (installs into {cache_dir()}), or " if self.config.weights is None else ""
        return (
            f"stage {self.name!r} ({cls.name}): {problem}. To fix: {fetch}{cls.download_hint()} and put it at "
            f"{self.weights_path} (or {cls.default_weights_path()}), or set `weights: /path/to/file` in this stage's entry of the "
            f"pipeline YAML. To run without NSFW filtering, set `enabled: false` on the stage or pass "
            f"--allow-missing-weights (the manifest will then say NSFW filtering was NOT applied). {WEIGHT_FREE_HINT}"
        )


STAGE = NsfwStage
