"""The dataset's column contract: what ``RUN/dataset`` (and the WebDataset tars) hold.

Versioned (``CONTRACT``) and documented in the README; the manifest names the version. Only
these columns are emitted: stage-internal columns (hashes, descriptors, face boxes, scores, the
decode flags) stay in ``stages/`` and are reached with ``curate query`` (``stage_<name>`` views,
joined on ``uid``). The image column follows the Hugging Face ``Image`` feature layout (a struct
of ``bytes`` and ``path``) and the Parquet schema carries the ``huggingface`` features metadata,
so ``datasets.load_dataset("parquet", ...)`` yields PIL images with no glue.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

from curation import schema

CONTRACT = "curation.dataset/1"
IMAGE = "image"
IMAGE_TYPE = pa.struct([pa.field("bytes", pa.binary()), pa.field("path", pa.string())])
KEY = "key"
SHA256 = "sha256"
CAPTION = "caption"


@dataclass(frozen=True)
class Column:
    name: str
    type: pa.DataType
    description: str
    optional: bool = False  # present only when some input had a value (caption, label)


COLUMNS: tuple[Column, ...] = (
    Column(KEY, pa.string(), "unique sample key, `<ingest shard>_<row>`; the WebDataset `__key__`"),
    Column(IMAGE, IMAGE_TYPE, "the stored image: `bytes` (after normalisation and face blurring) and `path` (`<key>.<ext>`, a file-name hint)"),
    Column(schema.UID, pa.int64(), "row id of the run: joins the ledger and the `stage_<name>` views of `curate query`"),
    Column(schema.ID, pa.string(), "SHA-256 of the input bytes, as ingested (identifies the input even after re-encoding or blurring)"),
    Column(SHA256, pa.string(), "SHA-256 of `image.bytes` as stored"),
    Column(schema.FORMAT, pa.string(), "image format of the stored bytes (JPEG, PNG, WEBP, ...)"),
    Column(schema.WIDTH, pa.int32(), "width of the stored image in pixels"),
    Column(schema.HEIGHT, pa.int32(), "height of the stored image in pixels"),
    Column("original_width", pa.int32(), "width of the input as read from its header (before EXIF orientation)"),
    Column("original_height", pa.int32(), "height of the input as read from its header"),
    Column(schema.SOURCE, pa.string(), "`pool` or `seed:<name>`: which input the image came from"),
    Column(schema.SOURCE_KEY, pa.string(), "where in that input: file path, `tar::member`, `parquet::row` or the URL"),
    Column("url", pa.string(), "the URL it was downloaded from, or the URL recorded next to it in the input (null for local files)"),
    Column(CAPTION, pa.string(), "caption or alt text of the input (a caption column, a tar sample's .txt)", optional=True),
    Column(schema.LABEL, pa.string(), "class label of the input (a class folder, a label column, a tar sample's .cls)", optional=True),
    Column("method", pa.string(), "provenance: as_is (a seed taken as it is), sample / cluster (retrieved), retrieved, or pool (no retrieval stage)"),
    Column(schema.SEED_DATASET, pa.string(), "provenance: the seed dataset that brought the image in"),
    Column("seed_ids", pa.list_(pa.string()), "provenance: `id`s of the seed images that retrieved it"),
    Column("similarity", pa.float32(), "provenance: cosine similarity to the closest retrieving seed"),
    Column("cluster_id", pa.int64(), "provenance: the k-means cluster it was retrieved from"),
)
PROVENANCE = ("method", schema.SEED_DATASET, "seed_ids", "similarity", "cluster_id")

# What the emit reads from the run's stages to build the columns (image bytes from the latest
# writer; the original size from ingest).
READ_COLUMNS = [schema.ROLE, schema.ID, schema.SOURCE, schema.SOURCE_KEY, schema.BYTES, schema.FORMAT, schema.WIDTH, schema.HEIGHT,
                schema.SEED_DATASET, schema.LABEL, "url", CAPTION]

EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff", "MPO": "jpg", "AVIF": "avif", "HEIF": "heic"}


def extension(fmt: str | None) -> str:
    return EXTENSIONS.get((fmt or "").upper(), "img")


def make_key(uid: int) -> str:
    return f"{schema.shard_of_uid(uid):06d}_{uid & (schema.MAX_SHARD_ROWS - 1):07d}"


def output_schema(optional: list[str], extra: list[pa.Field]) -> pa.Schema:
    """The dataset's schema: the stable columns (optional ones only when named in ``optional``),
    then the pass-through columns, with the Hugging Face features metadata."""
    fields = [pa.field(c.name, c.type) for c in COLUMNS if not c.optional or c.name in optional]
    fields += list(extra)
    meta = {
        b"huggingface": json.dumps({"info": {"features": {IMAGE: {"_type": "Image"}}}}).encode(),
        b"curation": json.dumps({"contract": CONTRACT}).encode(),
    }
    return pa.schema(fields, metadata=meta)


def describe(optional: list[str], extra: list[pa.Field]) -> list[dict]:
    """Name, Arrow type and meaning of every column, for the manifest and the dataset card."""
    out = [{"name": c.name, "type": str(c.type), "description": c.description} for c in COLUMNS if not c.optional or c.name in optional]
    out += [{"name": f.name, "type": str(f.type), "description": "passed through from the input (ingest.extra_columns)"} for f in extra]
    return out


def build(rows: pa.Table, original: pa.Table, out_schema: pa.Schema) -> pa.Table:
    """The contract table of kept ``rows`` (uid + ``READ_COLUMNS`` + provenance + extras, in uid
    order) with ``original`` (uid, width, height as ingested) for the same uids."""
    n = rows.num_rows
    uids = rows.column(schema.UID).to_pylist()
    keys = [make_key(u) for u in uids]
    data = rows.column(schema.BYTES).to_pylist()
    fmts = rows.column(schema.FORMAT).to_pylist()
    paths = [f"{k}.{extension(f)}" for k, f in zip(keys, fmts)]
    image = pa.StructArray.from_arrays([pa.array(data, pa.binary()), pa.array(paths, pa.string())], fields=list(IMAGE_TYPE))
    cols: dict[str, pa.Array] = {
        KEY: pa.array(keys, pa.string()),
        IMAGE: image,
        SHA256: pa.array([hashlib.sha256(b).hexdigest() if b is not None else None for b in data], pa.string()),
        "original_width": original.column(schema.WIDTH),
        "original_height": original.column(schema.HEIGHT),
    }
    arrays = []
    for f in out_schema:
        if f.name in cols:
            col = cols[f.name]
        elif f.name in rows.column_names:
            col = rows.column(f.name)
        else:
            col = pa.nulls(n, f.type)
        arrays.append(col.cast(f.type) if col.type != f.type else col)
    return pa.Table.from_arrays(arrays, schema=out_schema)


def sample_metadata(row: dict) -> dict:
    """A WebDataset sample's ``.json``: every column but the image, JSON-ready."""
    return {k: v for k, v in row.items() if k != IMAGE}
