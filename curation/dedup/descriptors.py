"""Read descriptor columns (fixed-size lists of float16/float32) into float32 matrices."""

from __future__ import annotations

import numpy as np
import pyarrow as pa


class DescriptorError(ValueError):
    """A descriptor column that cannot be read as an [n, d] matrix."""


def descriptor_matrix(column: pa.ChunkedArray | pa.Array, name: str = "descriptor") -> tuple[np.ndarray, np.ndarray]:
    """(float32 [n, d] matrix, bool [n] valid). Null rows are zero vectors marked invalid.

    Accepts ``fixed_size_list<float16|float32|float64>`` (what the embed stage writes) and
    ``list`` columns whose non-null rows all have the same length.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    n = len(arr)
    valid = arr.is_valid().to_numpy(zero_copy_only=False).astype(bool) if n else np.zeros(0, bool)
    if pa.types.is_fixed_size_list(arr.type):
        d = arr.type.list_size
        values = arr.values.slice(arr.offset * d, n * d)
        flat = values.to_numpy(zero_copy_only=False)
        if values.null_count:
            flat = np.nan_to_num(flat.astype(np.float32))
        return np.ascontiguousarray(flat.reshape(n, d), dtype=np.float32), valid
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        present = lengths[valid]
        if len(present) and (present != present[0]).any():
            raise DescriptorError(f"column {name!r}: descriptors of different lengths {sorted(set(present.tolist()))[:5]}")
        d = int(present[0]) if len(present) else 0
        out = np.zeros((n, d), np.float32)
        if len(present):
            out[valid] = arr.filter(pa.array(valid)).flatten().to_numpy(zero_copy_only=False).reshape(-1, d)
        return out, valid
    raise DescriptorError(f"column {name!r} has type {arr.type}; expected a fixed-size list of floats")


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """L2-normalise rows in place-safe float32 (zero rows stay zero) so that dot = cosine."""
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
