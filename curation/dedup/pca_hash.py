"""PCA sign-bit hashes: project descriptors on their top principal components and keep the
signs. Near-identical images land on the same side of every hyperplane except those they sit
close to, so duplicates share all or almost all bits (DINOv2's first deduplication step)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class PcaProjection:
    mean: np.ndarray  # [d]
    components: np.ndarray  # [bits, d], rows = principal axes, by decreasing variance
    explained_variance: np.ndarray  # [bits]
    total_variance: float  # trace of the sample covariance

    @property
    def explained_variance_ratio(self) -> float:
        return float(self.explained_variance.sum() / max(self.total_variance, 1e-12))

    @property
    def bits(self) -> int:
        return len(self.components)


def fit_pca(x: np.ndarray, bits: int, sample_size: int = 100_000, seed: int = 0) -> PcaProjection:
    """Principal axes from a random sample of at most ``sample_size`` rows of ``x``."""
    n, d = x.shape
    if bits > d:
        raise ValueError(f"cannot take {bits} sign bits from {d}-dimensional descriptors; use bits <= {d}")
    if n < 2:
        raise ValueError("PCA needs at least two descriptors")
    rng = np.random.default_rng(seed)
    sample = x if n <= sample_size else x[np.sort(rng.choice(n, sample_size, replace=False))]
    sample = sample.astype(np.float64)
    mean = sample.mean(axis=0)
    centred = sample - mean
    cov = centred.T @ centred / max(1, len(sample) - 1)
    eigval, eigvec = np.linalg.eigh(cov)  # ascending
    top = np.argsort(eigval)[::-1][:bits]
    return PcaProjection(
        mean.astype(np.float32), eigvec[:, top].T.astype(np.float32), eigval[top].astype(np.float32), float(np.trace(cov))
    )


def sign_codes(x: np.ndarray, projection: PcaProjection, chunk: int = 65_536) -> np.ndarray:
    """Packed sign bits uint8 [n, bits / 8], computed in chunks (memory linear in n).

    The projection is done in float64: a sign must not depend on how rows are batched (BLAS
    sums in an order that depends on the matrix shapes), or the single-task and partitioned
    forms, which batch rows differently, could disagree on a bit that sits near zero."""
    if projection.bits % 8:
        raise ValueError("bits must be a multiple of 8")
    out = np.empty((len(x), projection.bits // 8), np.uint8)
    mean, comps = projection.mean.astype(np.float64), projection.components.astype(np.float64)
    for start in range(0, len(x), chunk):
        proj = (x[start : start + chunk].astype(np.float64) - mean) @ comps.T
        out[start : start + chunk] = np.packbits(proj > 0, axis=1)
    return out
