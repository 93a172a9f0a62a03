"""Retrieval embeddings for every row (pool, seeds and evaluation images alike).

Seeds are retrieval queries and evaluation images may be compared against later, so all roles
are embedded with the same model. On a GPU the stage runs one actor per GPU; decoding and
preprocessing happen in a thread pool that works ``prefetch`` model batches ahead of the model,
so the GPU is not left waiting for JPEG decoding (the benchmark in benchmarks/embed.py measures
how close the stage gets to the bare forward pass). When the model runs on a GPU and its
preprocessing has a tensor form (timm, SSCD), JPEGs are batch-decoded by nvJPEG and preprocessed
on the GPU instead, on a stream of their own (``embedders/gpu_decode.py``); other formats and
whatever nvJPEG rejects take the CPU path image by image. On the CPU path JPEGs are decoded no
larger than the preprocessing needs (``Embedder.decode_min_size``).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import numpy as np
import pyarrow as pa
from pydantic import Field, field_validator

from curation import schema
from curation.imaging import DecodeError, decode_with_info
from curation.devices import torch_device_name, wants_gpu
from curation.stage import WEIGHT_FREE_HINT, MapStage, OptionalWeights, Resources, StageError
from curation.stages._images import ImageStageConfig, error_details
from embedders import DEFAULT_RETRIEVAL_MODEL, EmbedderUnavailable, build_embedder, check_available, output_dim, parse_spec
from embedders.registry import PixelsSpec, SscdSpec, TimmSpec


class EmbedConfig(ImageStageConfig):
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
    gpu_decode: Literal["auto", "always", "never"] = Field(
        "auto",
        description="batch-decode JPEGs with nvJPEG and preprocess them on the GPU when the model runs on one (auto); "
        "always: also on the CPU, through torchvision's decoder (for tests and comparisons); never: Pillow in decode threads",
    )

    @field_validator("model", mode="before")
    @classmethod
    def _default_type(cls, v):
        return parse_spec(v) if isinstance(v, dict) else v

    def model_needs(self) -> list:
        from curation.models import embedder_needs

        return embedder_needs(self.stage_name, self.model)


class EmbedStage(OptionalWeights, MapStage):
    kind = "embed"
    Config = EmbedConfig
    roles = schema.ROLES

    def __init__(self, config, context):
        super().__init__(config, context)
        self._dim: int | None = None
        self.embedder = None
        self._pool: ThreadPoolExecutor | None = None
        self._not_applied: str | None = None  # why this worker runs NOT applied (--allow-missing-weights)
        self.batch_decoder = None
        self._device_pool: ThreadPoolExecutor | None = None

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

    def weights_problem(self) -> str | None:
        try:
            check_available(self.config.model)
        except EmbedderUnavailable as e:
            return str(e)
        return None

    def not_applied_what(self) -> str:
        return f"embedding stage {self.name!r} (column {self.config.column!r})"

    def missing_weights_help(self, problem: str) -> str:
        return (
            f"stage {self.name}: {problem}. `curate models list` shows every missing file and `curate models fetch` "
            f"installs them; --allow-missing-weights runs this stage NOT applied (its column stays empty). {WEIGHT_FREE_HINT}"
        )

    def preflight(self) -> list[str]:
        warnings = self.weights_preflight()
        try:
            self.dim  # noqa: B018 - resolves the architecture (bad names fail here, not on workers)
        except EmbedderUnavailable as e:
            raise StageError(f"stage {self.name}: {e}" + ("; it cannot run NOT applied either: its output size comes from that file" if warnings else "")) from None
        except RuntimeError as e:  # timm: unknown model name
            raise StageError(f"stage {self.name}: cannot build model {self.config.model.model_dump()}: {e}") from None
        return warnings

    def manifest_section(self) -> dict:
        facts = {"model": self.config.model.model_dump(), "column": self.config.column, "dim": self.dim, "dtype": self.config.dtype}
        return {**(self.not_applied_section() or {}), **facts}

    # -- work -----------------------------------------------------------------------------
    def setup(self) -> None:
        import torch

        cfg = self.config
        if self.context.allow_missing_weights:
            self._not_applied = self.weights_problem()
            if self._not_applied is not None:
                return  # every row gets a null embedding; the manifest says NOT applied
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
        self.batch_decoder = self._make_batch_decoder()
        if self.batch_decoder is not None:
            self._device_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-device-decode")

    def _make_batch_decoder(self):
        mode = self.config.gpu_decode
        if mode == "never" or (mode == "auto" and self.embedder.device.type != "cuda"):
            return None
        preprocess = self.embedder.tensor_preprocess()
        if preprocess is None or self.embedder.decode_mode != "RGB":
            if mode == "always":
                raise StageError(f"stage {self.name}: {self.embedder.name} has no tensor preprocessing to run after GPU decoding; set gpu_decode: auto")
            return None
        from embedders.gpu_decode import BatchJpegDecoder

        return BatchJpegDecoder(preprocess, self.embedder.device, self._prepare, self.config.decode_limits, self._pool)

    def _prepare(self, data: bytes | None):
        """CPU path: decode (no larger than the preprocessing needs) + preprocess one image;
        a DecodeError becomes the row's drop reason."""
        emb = self.embedder
        try:
            img, _ = decode_with_info(data or b"", **self.config.decode_limits, min_size=emb.decode_min_size, mode=emb.decode_mode)
            return emb.preprocess(img)
        except DecodeError as e:
            return e

    def _submit(self, blobs: list) -> Callable[[], list]:
        """Start preparing one model batch; the returned call waits for its inputs."""
        if self.batch_decoder is not None:
            future = self._device_pool.submit(self.batch_decoder.prepare, blobs)
            return lambda: future.result().wait()
        futures = [self._pool.submit(self._prepare, b) for b in blobs]
        return lambda: [f.result() for f in futures]

    def process(self, batch: pa.Table) -> pa.Table:
        if self.embedder is None and self._not_applied is None:
            self.setup()
        if self._not_applied is not None:
            n = batch.num_rows
            return pa.table({self.config.column: pa.nulls(n, self.arrow_type), schema.DROP_REASON: pa.nulls(n, pa.string()), schema.DROP_DETAILS: pa.nulls(n, pa.string())})
        blobs = batch.column(schema.BYTES).to_pylist()
        n, bs = len(blobs), self.config.batch_size
        starts = list(range(0, n, bs))
        pending: dict[int, Callable[[], list]] = {}

        def submit(j: int) -> None:
            if j < len(starts) and j not in pending:
                pending[j] = self._submit(blobs[starts[j] : starts[j] + bs])

        emb = np.zeros((n, self.dim), np.float32)
        ok = np.zeros(n, bool)
        reasons: list[str | None] = [None] * n
        details: list[str | None] = [None] * n
        for j in range(min(self.config.prefetch + 1, len(starts))):
            submit(j)
        for j, start in enumerate(starts):
            prepared = pending.pop(j)()
            submit(j + self.config.prefetch + 1)  # keep decode threads busy while the model runs
            rows = [start + i for i, p in enumerate(prepared) if not isinstance(p, DecodeError)]
            for i, p in enumerate(prepared):
                if isinstance(p, DecodeError):
                    reasons[start + i] = p.reason
                    details[start + i] = error_details(p)
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
