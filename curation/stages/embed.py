"""Retrieval embeddings for every row (pool, seeds and evaluation images alike).

Seeds are retrieval queries and evaluation images may be compared against later, so all roles
are embedded with the same model. On a GPU the stage runs one actor per GPU; decoding and
preprocessing happen in a thread pool that works ``prefetch`` model batches ahead of the model,
so the GPU is not left waiting for JPEG decoding (the benchmark in benchmarks/embed.py measures
how close the stage gets to the bare forward pass).
"""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curation import schema
from curation.imaging import DEFAULT_MAX_PIXELS, DecodeError, decode_rgb
from curation.devices import torch_device_name, wants_gpu
from curation.stage import WEIGHT_FREE_HINT, MapStage, Resources, StageConfig, StageError
from embedders import DEFAULT_RETRIEVAL_MODEL, EmbedderUnavailable, build_embedder, check_available, output_dim, parse_spec
from embedders.registry import PixelsSpec, SscdSpec, TimmSpec


class EmbedConfig(StageConfig):
    kind: Literal["embed"] = "embed"
    model: TimmSpec | SscdSpec | PixelsSpec = Field(
        default_factory=lambda: TimmSpec(name=DEFAULT_RETRIEVAL_MODEL),
        description="embedder spec: {type: timm|sscd|pixels, ...}; see embedders/registry.py",
    )
    column: str = Field("embedding", description="output column (fixed-size list, L2-normalised)")
    batch_size: int = Field(64, ge=1, description="images per model forward pass")
    rows_per_call: int = Field(1024, ge=1, description="rows handed to one process() call; decoding overlaps the model within it")
    prefetch: int = Field(2, ge=1, description="model batches decoded ahead of the one running")
    decode_threads: int = Field(0, ge=0, description="decode/preprocess threads per worker; 0 = the worker's CPUs")
    cpus_per_worker: float = Field(4, gt=0, description="CPUs reserved per worker (decode threads + host work)")
    dtype: Literal["float16", "float32"] = "float16"
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)

    @field_validator("model", mode="before")
    @classmethod
    def _default_type(cls, v):
        return parse_spec(v) if isinstance(v, dict) else v


class EmbedStage(MapStage):
    kind = "embed"
    Config = EmbedConfig
    roles = schema.ROLES

    def __init__(self, config, context):
        super().__init__(config, context)
        self._dim: int | None = None
        self.embedder = None
        self._pool: ThreadPoolExecutor | None = None

    # -- contract -------------------------------------------------------------------------
    def input_columns(self):
        return (schema.BYTES,)

    @property
    def dim(self) -> int:
        if self._dim is None:
            self._dim = self.embedder.dim if self.embedder is not None else output_dim(self.config.model)
        return self._dim

    @property
    def arrow_type(self) -> pa.DataType:
        return pa.list_(pa.float16() if self.config.dtype == "float16" else pa.float32(), self.dim)

    def output_schema(self) -> pa.Schema:
        return pa.schema([pa.field(self.config.column, self.arrow_type)])

    def resources(self) -> Resources:
        cfg = self.config
        cpus = max(1.0, min(float(cfg.cpus_per_worker), float(max(1, self.context.cluster_cpus))))
        if wants_gpu(self.context.cluster_gpus):
            workers = max(1, self.context.cluster_gpus)
            return Resources(num_cpus=cpus, num_gpus=1, concurrency=(1, workers), batch_size=cfg.rows_per_call)
        workers = max(1, int(self.context.cluster_cpus // cpus))
        return Resources(num_cpus=cpus, concurrency=(1, workers), batch_size=cfg.rows_per_call)

    def preflight(self) -> list[str]:
        try:
            check_available(self.config.model)
            self.dim  # noqa: B018 - resolves the architecture (bad names fail here, not on workers)
        except EmbedderUnavailable as e:
            raise StageError(f"stage {self.name}: {str(e).rstrip('.')}. {WEIGHT_FREE_HINT}") from None
        except RuntimeError as e:  # timm: unknown model name
            raise StageError(f"stage {self.name}: cannot build model {self.config.model.model_dump()}: {e}") from None
        return []

    def manifest_section(self) -> dict:
        return {"model": self.config.model.model_dump(), "column": self.config.column, "dim": self.dim, "dtype": self.config.dtype}

    # -- work -----------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        cfg = self.config
        threads = cfg.decode_threads or max(1, int(self.resources().num_cpus))
        if torch_device_name() == "cpu":
            torch.set_num_threads(threads)  # one worker's share; Ray runs several side by side
        try:
            self.embedder = build_embedder(cfg.model, batch_size=cfg.batch_size)
        except EmbedderUnavailable as e:
            raise StageError(f"stage {self.name}: {e}") from None
        if self._dim is not None and self._dim != self.embedder.dim:
            raise StageError(f"stage {self.name}: model gives {self.embedder.dim}-d embeddings, schema says {self._dim}")
        self._dim = self.embedder.dim
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="embed-decode")

    def _prepare(self, data: bytes | None):
        """Decode + preprocess one image; a DecodeError becomes the row's drop reason."""
        try:
            return self.embedder.preprocess(decode_rgb(data or b"", self.config.max_pixels))
        except DecodeError as e:
            return e

    def process(self, batch: pa.Table) -> pa.Table:
        if self.embedder is None:
            self.setup()
        blobs = batch.column(schema.BYTES).to_pylist()
        n, bs = len(blobs), self.config.batch_size
        starts = list(range(0, n, bs))
        pending: dict[int, list[Future]] = {}

        def submit(j: int) -> None:
            if j < len(starts) and j not in pending:
                pending[j] = [self._pool.submit(self._prepare, b) for b in blobs[starts[j] : starts[j] + bs]]

        emb = np.zeros((n, self.dim), np.float32)
        ok = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        for j in range(min(self.config.prefetch + 1, len(starts))):
            submit(j)
        for j, start in enumerate(starts):
            prepared = [f.result() for f in pending.pop(j)]
            submit(j + self.config.prefetch + 1)  # keep decode threads busy while the model runs
            rows = [start + i for i, p in enumerate(prepared) if not isinstance(p, DecodeError)]
            for i, p in enumerate(prepared):
                if isinstance(p, DecodeError):
                    reasons[start + i] = p.reason
                    details[start + i] = json.dumps({"error": str(p)[:300]})
            if rows:
                emb[rows] = self.embedder.embed_preprocessed([prepared[r - start] for r in rows])
                ok[rows] = True
        values = pa.array(emb.astype(np.float16 if self.config.dtype == "float16" else np.float32).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.dim, mask=pa.array(~ok))
        return pa.table(
            {
                self.config.column: column,
                schema.DROP_REASON: pa.array(reasons, pa.string()),
                schema.DROP_DETAILS: pa.array(details, pa.string()),
            }
        )


STAGE = EmbedStage
