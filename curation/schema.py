"""Column names and Arrow types shared by every stage.

Rows are identified by ``uid`` (int64, unique per input item, stable across re-runs because it
is derived from the deterministic ingest plan) while ``id`` is the content hash of the bytes
(so exact duplicates share an ``id`` but never a ``uid``).
"""

from __future__ import annotations

import pyarrow as pa

UID = "uid"
ID = "id"
ROLE = "role"
SOURCE = "source"
SOURCE_KEY = "source_key"
BYTES = "bytes"
FORMAT = "format"
WIDTH = "width"
HEIGHT = "height"
SEED_DATASET = "seed_dataset"
LABEL = "label"

# Columns a map stage returns to drop rows: a null reason keeps the row.
DROP_REASON = "drop_reason"
DROP_DETAILS = "drop_details"

# Roles of an input image. Pool images are candidates for the dataset, seed images are curated
# references (emitted as-is or used as retrieval queries), exclude images are evaluation sets
# used for decontamination and never emitted.
POOL, SEED, EXCLUDE = "pool", "seed", "exclude"
ROLES = (POOL, SEED, EXCLUDE)

INGEST_SCHEMA = pa.schema(
    [
        pa.field(UID, pa.int64(), nullable=False),
        pa.field(ID, pa.string(), nullable=False),
        pa.field(ROLE, pa.string(), nullable=False),
        pa.field(SOURCE, pa.string(), nullable=False),
        pa.field(SOURCE_KEY, pa.string(), nullable=False),
        pa.field(BYTES, pa.binary()),
        pa.field(FORMAT, pa.string()),
        pa.field(WIDTH, pa.int32()),
        pa.field(HEIGHT, pa.int32()),
        pa.field(SEED_DATASET, pa.string()),
        pa.field(LABEL, pa.string()),
        # URL metadata: null for local inputs.
        pa.field("url", pa.string()),
        pa.field("final_url", pa.string()),
        pa.field("http_status", pa.int32()),
        pa.field("content_type", pa.string()),
        # A caption or alt text recorded with the input (caption column, tar sample .txt).
        pa.field("caption", pa.string()),
    ]
)

# uid = shard << UID_SHARD_BITS | row: shards hold at most 2**20 items.
UID_SHARD_BITS = 20
MAX_SHARD_ROWS = 1 << UID_SHARD_BITS


def make_uid(shard: int, row: int) -> int:
    if not 0 <= row < MAX_SHARD_ROWS:
        raise ValueError(f"row {row} outside a shard of at most {MAX_SHARD_ROWS} rows")
    return (shard << UID_SHARD_BITS) | row


def shard_of_uid(uid: int) -> int:
    return uid >> UID_SHARD_BITS
